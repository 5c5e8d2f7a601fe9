"""GPU paths: CUDA + bf16, fp16 with a gradient scaler, FSDP, DeepSpeed. Skipped where no CUDA device is visible."""

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import recipe_values, write_recipe

pytestmark = [
    pytest.mark.integration,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def finetune(tmp_path, *overrides: str, nproc: int = 1) -> dict:
    recipe = write_recipe(
        tmp_path / "r.yaml", recipe_values(tmp_path, engine={"device": "cuda", "precision": "bf16", "seed": 0})
    )
    done = subprocess.run(
        [sys.executable, "-m", "sft_cli", "finetune", str(recipe), *overrides, "--nproc", str(nproc)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / "run" / "summary.json").read_text())


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_cuda_precisions_train(tmp_path, precision):
    summary = finetune(tmp_path, f"engine.precision={precision}")
    assert summary["device"].startswith("cuda") and summary["precision"] == ("no" if precision == "fp32" else precision)
    assert summary["peak_gpu_mb"] > 0 and summary["final_train_loss"] < 0.5


def test_grad_checkpointing_and_compile(tmp_path):
    summary = finetune(tmp_path, "engine.grad_checkpointing=true", "engine.compile=true")
    assert summary["final_train_loss"] < 0.5


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP needs 2 GPUs")
def test_fsdp_two_gpus(tmp_path):
    summary = finetune(tmp_path, "engine.distributed.strategy=fsdp", nproc=2)
    assert summary["num_processes"] == 2


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_one_gpu(tmp_path, stage):
    pytest.importorskip("deepspeed")
    summary = finetune(tmp_path, "engine.distributed.strategy=deepspeed", f"engine.distributed.zero_stage={stage}")
    assert summary["device"].startswith("cuda") and summary["final_train_loss"] < 0.5
