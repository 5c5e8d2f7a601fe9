"""Device choice: several processes without CUDA form a gloo group; a lone process under a launcher is refused."""

import json
import os

import pytest
import torch

from sft_cli.config.schema import EngineConfig
from sft_cli.engine import accelerator as device
from sft_cli.errors import SftError


@pytest.mark.parametrize(
    "requested, world, cuda, expected",
    [
        ("cpu", 1, False, True),
        ("cpu", 2, True, True),
        ("auto", 1, False, False),  # one process: Accelerate picks CPU/MPS by itself
        ("auto", 2, False, True),  # the defect: without this, each process trained alone
        ("mps", 2, False, True),  # MPS has no process group
        ("auto", 2, True, False),  # CUDA: nccl
        ("cuda", 2, True, False),
    ],
)
def test_several_processes_without_cuda_take_the_cpu_path(monkeypatch, requested, world, cuda, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert device.runs_on_cpu(requested, world) is expected


def test_launcher_world_size_reads_the_launchers_variables(monkeypatch):
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert device.launcher_world_size() == 1
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert device.launcher_world_size() == 4
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert device.launcher_world_size() == 2


def test_a_launch_that_ends_with_one_process_stops_before_any_compute(monkeypatch):
    """The guard: WORLD_SIZE=2 but the engine sees one process -> one-line error, no training."""

    class LoneAccelerator:  # what Accelerate gives when it finds no backend for the launch
        num_processes = 1

        def __init__(self, **kwargs):
            pass

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(device, "Accelerator", LoneAccelerator)
    monkeypatch.setattr(device, "runs_on_cpu", lambda requested, world: False)  # as before the fix
    with pytest.raises(SftError) as err:
        device.make_accelerator(EngineConfig(device="auto", precision="fp32"))
    message = str(err.value)
    assert "2 processes" in message and "joined 1" in message and "\n" not in message
    device.check_process_group(2, 2, "auto")  # a real group passes
    device.check_process_group(1, 1, "auto")


def test_fsdp_off_cuda_is_left_to_the_engine():
    config = EngineConfig()
    config.distributed.strategy = "fsdp"  # Accelerate's CPU path would wrap DDP: the engine shards (FSDP2) itself
    assert device.sharding_plugins(config, on_gpu=False) == {}
    assert device.sharding_plugins(EngineConfig(), on_gpu=False) == {}


@pytest.fixture
def no_launcher(monkeypatch):
    """No launcher variables; whatever the code under test sets is undone afterwards (monkeypatch recorded them)."""
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_deepspeed_off_cuda_gets_its_plugin_and_a_real_gloo_group(monkeypatch, no_launcher):
    pytest.importorskip("deepspeed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = EngineConfig()
    config.distributed.strategy = "deepspeed"
    config.distributed.zero_stage = 3
    kwargs = device.sharding_plugins(config, on_gpu=False)
    assert kwargs["deepspeed_plugin"].zero_stage == 3
    # without a named backend Accelerate leaves it unset off CUDA and every process believes it is rank 0
    assert [h.backend for h in kwargs["kwargs_handlers"]] == ["gloo"]
    assert os.environ["WORLD_SIZE"] == "1" and os.environ["LOCAL_RANK"] == "0"  # a run without a launcher
    config.device = "mps"
    with pytest.raises(SftError, match="DeepSpeed runs on CUDA or CPU"):
        device.sharding_plugins(config, on_gpu=False)


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}, None),
        ({"optimizer": {"type": "AdamW"}}, "remove its 'optimizer' section — sft builds it from the recipe's optim"),
        ({"scheduler": {"type": "WarmupLR"}}, "remove its 'scheduler' section"),
        ({"gradient_accumulation_steps": 4}, "'gradient_accumulation_steps' is 4 but schedule.grad_accum is 1"),
        ({"train_micro_batch_size_per_gpu": 8}, "'train_micro_batch_size_per_gpu' is 8 but schedule.batch_size is 16"),
        ([1, 2], "must be a JSON object"),
        ("{not json", "is not a readable JSON file"),
    ],
)
def test_a_deepspeed_config_file_must_agree_with_the_recipe(tmp_path, settings, expected):
    from sft_cli.config.schema import ScheduleConfig
    from sft_cli.config.validation import config_file_problem

    path = tmp_path / "ds.json"
    path.write_text(settings if isinstance(settings, str) else json.dumps(settings))
    problem = config_file_problem(str(path), ScheduleConfig(batch_size=16, grad_accum=1))
    if expected is None:
        assert problem is None
    else:
        assert expected in problem and str(path) in problem and "\n" not in problem


def test_deepspeed_without_its_package_is_a_one_line_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed
    config = EngineConfig()
    config.distributed.strategy = "deepspeed"
    with pytest.raises(SftError, match=r"pip install 'sft\[deepspeed\]'"):
        device.sharding_plugins(config, on_gpu=True)


def test_fsdp_on_gpu_asks_accelerate_for_fsdp2():
    config = EngineConfig()
    config.distributed.strategy = "fsdp"
    config.distributed.fsdp = {"cpu_offload": False}
    plugin = device.sharding_plugins(config, on_gpu=True)["fsdp_plugin"]
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True


def test_a_deepspeed_run_earlier_in_the_process_leaves_nothing_to_the_next(no_launcher):
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    from sft_cli.engine.parallel.deepspeed import set_launcher_environment

    pytest.importorskip("deepspeed")
    set_launcher_environment()  # as a single-process DeepSpeed recipe in `sft check` or a sweep does
    left_over = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    assert is_deepspeed_zero3_enabled() and os.environ["LOCAL_RANK"] == "0"
    accelerator = device.make_accelerator(EngineConfig(device="cpu", precision="fp32"))
    assert not is_deepspeed_zero3_enabled() and left_over is not None  # models are not built partitioned
    assert "LOCAL_RANK" not in os.environ and accelerator.num_processes == 1  # no launcher, no process group
