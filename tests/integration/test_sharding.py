"""Sharded training on CPU/gloo through the real CLI — FSDP2, and DeepSpeed ZeRO-2 where DeepSpeed is
installed: 2 sharded processes, killed with kill -9 and resumed, train like 1; every rank writes its part of a
checkpoint, and the consolidated model/ loads with from_pretrained."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, read_jsonl, write_recipe

pytestmark = pytest.mark.integration
TOLERANCE = 1e-4  # gloo reduce-scatter sums in another order than one process does
# strategy -> (batch_size, grad_accum): 2 ranks x 4, or 2 ranks x 2 x 2 accumulated (DeepSpeed steps inside backward)
STRATEGIES = {"fsdp": (4, 1), "deepspeed": (2, 2)}
# what each rank writes into checkpoints/step-N/ (and nothing is gathered into a model/ there)
RANK_FILES = {
    "fsdp": ("sharded/*.distcp", ["__0_0.distcp", "__1_0.distcp"]),
    "deepspeed": (
        "deepspeed/state/*optim_states.pt",
        ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"],
    ),
}


def sft(*args: str, wait: bool = True):
    cmd = [sys.executable, "-m", "sft_cli", *args]
    if not wait:
        return subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(
    scope="module",
    params=[
        "fsdp",
        pytest.param(
            "deepspeed",
            marks=pytest.mark.skipif(
                not has_deepspeed(), reason="DeepSpeed not installed (pip install 'sft[deepspeed]')"
            ),
        ),
    ],
)
def strategy(request) -> str:
    return request.param


def recipe(tmp: Path, name: str, strategy: str, batch: int, accum: int = 1, zero_stage: int = 2) -> Path:
    values = {
        "name": name,
        "task": "language-modeling",
        "objective": "clm",
        "backbone": {
            "arch": "llama",
            "from_scratch": True,
            "config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
            },
        },
        "tokenizer": {"train": True, "vocab_size": 300},
        "data": {
            "train": str(REPO / "data" / "python-docs" / "eval.txt"),
            "eval": str(REPO / "data" / "python-docs" / "eval.txt"),
            "max_length": 32,
        },
        "optim": {"lr": 3e-3},
        "schedule": {
            "max_steps": 10,
            "batch_size": batch,
            "grad_accum": accum,
            "log_every": 1,
            "warmup": 0.0,
            "eval_every": "5",
        },
        "engine": {
            "device": "cpu",
            "precision": "fp32",
            "seed": 0,
            "distributed": {"strategy": strategy, "zero_stage": zero_stage},
        },
        "output": {"dir": str(tmp / name), "save_every": 4, "keep": 3, "keep_best": False},
    }
    return write_recipe(tmp / f"{name}.yaml", values)


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process, global batch 8, no sharding (in-process): what the sharded runs must reproduce."""
    tmp = tmp_path_factory.mktemp("sharding")
    from sft_cli.commands import train as commands
    from sft_cli.config.recipe import load_recipe

    commands.train(load_recipe(recipe(tmp, "one", "ddp", 8)), "pretrain")
    return tmp


@pytest.fixture(scope="module")
def runs(reference, strategy) -> Path:
    """Two sharded processes, killed with kill -9 (launcher and both ranks) after the step-4 checkpoint, resumed."""
    from tests.integration.test_schedules_resume import _wait_for_checkpoint

    sharded = recipe(reference, strategy, strategy, *STRATEGIES[strategy])
    process = sft("pretrain", str(sharded), "--nproc", "2", wait=False)
    _wait_for_checkpoint(reference / strategy, process, 4)
    os.killpg(process.pid, signal.SIGKILL)  # as a node crash would
    process.wait()
    assert not (reference / strategy / "summary.json").exists(), "the run finished before it could be killed"
    sft("pretrain", str(sharded), "--nproc", "2", "--resume")
    return reference


def test_a_killed_and_resumed_sharded_run_trains_like_one_process(runs, strategy):
    one, two = losses(runs / "one"), losses(runs / strategy)
    assert len(one) == len(two) == 10  # the steps before the kill logged once, those after it once
    # equal losses: gradients averaged, not summed, over the shards, and the resume lost no optimizer,
    # scheduler or data position (either would move the later losses by far more than the tolerance)
    assert two == pytest.approx(one, abs=TOLERANCE)
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(runs / "one" / "model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(runs / strategy / "model").state_dict()
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < TOLERANCE
    assert not any(isinstance(v, torch.Tensor) and v.is_meta for v in b.values())
    summary = json.loads((runs / strategy / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 10


def test_checkpoints_are_sharded_one_file_per_rank(runs, strategy):
    checkpoint = runs / strategy / "checkpoints" / "step-00000008"
    pattern, expected = RANK_FILES[strategy]
    assert sorted(p.name for p in checkpoint.glob(pattern)) == expected
    assert not (checkpoint / "model").exists()  # nothing gathered on rank 0


def test_resuming_with_another_number_of_processes_is_one_line(runs, strategy):
    if strategy != "fsdp":
        pytest.skip("the same world-size check, before any strategy-specific state is read")
    wrong = subprocess.run(
        [sys.executable, "-m", "sft_cli", "pretrain", str(runs / f"{strategy}.yaml"), "--resume"],
        capture_output=True,
        text=True,
    )
    assert wrong.returncode == 2 and "resume with --nproc 2" in wrong.stderr and "Traceback" not in wrong.stderr


@pytest.mark.skipif(not has_deepspeed(), reason="DeepSpeed not installed (pip install 'sft[deepspeed]')")
def test_check_runs_deepspeed_recipes_one_after_another_in_one_process(reference):
    """`sft check` trains and evaluates each recipe in one process: nothing of one DeepSpeed run (its process
    groups, launcher variables, transformers' ZeRO-3 flag) may break the next, nor a ZeRO-3 plugin the eval."""
    recipes = [
        recipe(reference, "check-zero3", "deepspeed", 8, zero_stage=3),
        recipe(reference, "check-zero2", "deepspeed", 8),
        recipe(reference, "check-ddp", "ddp", 8),
    ]
    done = sft("check", *map(str, recipes), "--json")
    rows = json.loads(done.stdout)
    assert [(r["name"], r["status"]) for r in rows] == [
        ("check-zero3", "pass"),
        ("check-zero2", "pass"),
        ("check-ddp", "pass"),
    ], rows
