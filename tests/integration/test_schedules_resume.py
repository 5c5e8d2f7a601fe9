"""Schedules, early stopping, checkpoints and resume through the real CLI on a tiny random-init BERT."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import read_jsonl, recipe_values, write_recipe

pytestmark = pytest.mark.integration


def cli(*args: str, wait: bool = True):
    cmd = [sys.executable, "-m", "sft_cli", *args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def lrs(run: Path) -> list[float]:
    return [r["lr"] for r in read_jsonl(run / "metrics.jsonl") if "lr" in r]


def finetune(tmp: Path, name: str, **sections) -> Path:
    sections.setdefault("output", {"dir": str(tmp / name)})
    recipe = write_recipe(tmp / f"{name}.yaml", recipe_values(tmp, **sections))
    done = cli("finetune", str(recipe))
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp / name


def train_here(tmp: Path, name: str, **sections) -> Path:
    """The same training as `sft finetune`, in this process (the LR logged per step is what is checked)."""
    from sft_cli.commands import train as commands
    from sft_cli.config.recipe import load_recipe

    sections.setdefault("output", {"dir": str(tmp / name)})
    commands.train(load_recipe(write_recipe(tmp / f"{name}.yaml", recipe_values(tmp, **sections))), "finetune")
    return tmp / name


def test_schedulers_shape_the_learning_rate(tmp_path):
    base = {"epochs": 1, "batch_size": 16, "log_every": 1, "warmup": 0.0}  # 16 steps
    lr = 2e-3
    finetune = train_here
    constant = lrs(finetune(tmp_path, "constant", schedule={**base, "scheduler": "constant"}))
    assert constant == pytest.approx([lr] * 16)
    linear = lrs(finetune(tmp_path, "linear", schedule={**base, "scheduler": "linear"}))
    assert linear[-1] == 0 and all(a > b for a, b in zip(linear, linear[1:]))
    cosine = lrs(finetune(tmp_path, "cosine", schedule={**base, "scheduler": "cosine"}))
    assert cosine[7] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 8 / 16)))
    step = lrs(finetune(tmp_path, "step", schedule={**base, "scheduler": "step", "step_size": 4, "gamma": 0.5}))
    assert step[2] == lr and step[4] == lr / 2 and step[9] == lr / 4
    warm = lrs(finetune(tmp_path, "warm", schedule={**base, "scheduler": "constant", "warmup": 4}))
    assert warm[:4] == sorted(warm[:4]) and warm[0] < lr / 2 and warm[4:] == pytest.approx([lr] * 12)
    ratio = lrs(finetune(tmp_path, "ratio", schedule={**base, "scheduler": "constant", "warmup": 0.25}))
    assert ratio == pytest.approx(warm)


def test_plateau_reduces_lr_when_the_metric_stalls(tmp_path):
    # mode max on eval_loss: every evaluation after the first counts as "no improvement".
    run = finetune(
        tmp_path,
        "plateau",
        schedule={
            "epochs": 1,
            "batch_size": 16,
            "log_every": 1,
            "warmup": 0.0,
            "scheduler": "plateau",
            "gamma": 0.5,
            "eval_every": "4",
            "early_stopping": {"metric": "eval_loss", "mode": "max", "patience": 100},
        },
    )
    rates = lrs(run)
    assert rates[0] == 2e-3 and rates[-1] < 2e-3 / 2


def test_optimizers_all_train(tmp_path):
    for name in ("sgd", "adam", "adamw"):
        optim = {"name": name, "lr": 0.05 if name == "sgd" else 2e-3, "momentum": 0.9, "nesterov": name == "sgd"}
        run = train_here(
            tmp_path, name, optim=optim, schedule={"epochs": 6, "batch_size": 16, "warmup": 0.0, "log_every": 8}
        )
        losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
        assert losses[-1] < losses[0], name


def test_early_stopping_keeps_the_best_model(tmp_path):
    from safetensors.torch import load_file

    run = finetune(
        tmp_path,
        "early",
        schedule={
            "epochs": 6,
            "batch_size": 16,
            "warmup": 0.0,
            "eval_every": "2",
            "early_stopping": {"metric": "eval_loss", "mode": "max", "patience": 2},
        },
    )
    summary = json.loads((run / "summary.json").read_text())
    # patience 2 x eval_every 2: training stops two evaluations after the best one, long before 96 steps
    assert summary["steps"] == summary["best_step"] + 4 < 96
    assert summary["model_from_step"] == summary["best_step"]
    final, best = (
        load_file(str(run / "model" / "model.safetensors")),
        load_file(str(run / "best-model" / "model.safetensors")),
    )
    assert all(final[k].equal(best[k]) for k in final)


def _wait_for_checkpoint(run: Path, process, min_step: int) -> None:
    deadline = time.time() + 300
    while time.time() < deadline:
        done = [p for p in (run / "checkpoints").glob("step-*") if (p / "complete.json").exists()]
        if any(int(p.name.split("-")[1]) >= min_step for p in done):
            return
        assert process.poll() is None, process.stderr.read()[-2000:]
        time.sleep(0.01)
    raise AssertionError("no checkpoint appeared")


def whole_and_resumed_losses(command: str, whole: Path, killed: Path, kill_after: int) -> list[list[float]]:
    """Train `whole` uninterrupted; train `killed`, kill -9 it once its checkpoint at `kill_after` is complete and
    --resume it; the logged losses of both runs (their run directories are the recipes' output.dir)."""
    done = cli(command, str(whole))
    assert done.returncode == 0, done.stderr[-2000:]
    killed_dir = Path(yaml.safe_load(killed.read_text())["output"]["dir"])
    process = cli(command, str(killed), wait=False)
    _wait_for_checkpoint(killed_dir, process, kill_after)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed_dir / "summary.json").exists(), "the run finished before it could be killed"
    resumed = cli(command, str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole_dir = Path(yaml.safe_load(whole.read_text())["output"]["dir"])
    return [[r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r] for run in (whole_dir, killed_dir)]


def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path):
    schedule = {"epochs": 20, "batch_size": 16, "warmup": 0.1, "log_every": 1, "scheduler": "cosine"}
    output = {"save_every": 7, "keep": 2}
    whole = finetune(tmp_path, "whole", schedule=schedule, output={**output, "dir": str(tmp_path / "whole")})
    recipe = write_recipe(
        tmp_path / "killed.yaml",
        recipe_values(tmp_path, schedule=schedule, output={**output, "dir": str(tmp_path / "killed")}),
    )
    process = cli("finetune", str(recipe), wait=False)
    _wait_for_checkpoint(tmp_path / "killed", process, 21)
    process.send_signal(signal.SIGKILL)
    process.wait()
    steps_done = max(int(p.name.split("-")[1]) for p in (tmp_path / "killed" / "checkpoints").glob("step-*"))
    assert steps_done < 320, "the run finished before it could be killed"
    resumed = cli("finetune", str(recipe), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = json.loads((whole / "summary.json").read_text())
    b = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert b["steps"] == a["steps"] == 320
    assert b["final_train_loss"] == pytest.approx(a["final_train_loss"], abs=1e-6)
    assert b["eval"]["eval_loss"] == pytest.approx(a["eval"]["eval_loss"], abs=1e-6)
    la = [r["loss"] for r in read_jsonl(whole / "metrics.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_jsonl(tmp_path / "killed" / "metrics.jsonl") if "loss" in r]
    assert lb == pytest.approx(la, abs=1e-6)
    assert len(list((tmp_path / "killed" / "checkpoints").glob("step-*"))) == 2  # output.keep


def test_ctrl_c_checkpoints_and_prints_the_resume_command(tmp_path):
    recipe = write_recipe(
        tmp_path / "int.yaml",
        recipe_values(
            tmp_path,
            schedule={"epochs": 200, "batch_size": 16, "warmup": 0.0},
            output={"save_every": 5, "dir": str(tmp_path / "int")},
        ),
    )
    process = cli("finetune", str(recipe), wait=False)
    _wait_for_checkpoint(tmp_path / "int", process, 5)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "resume with:" in stderr and "--resume" in stderr
    resumed = cli("finetune", str(recipe), "schedule.epochs=2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_values(tmp_path))
    done = cli("finetune", str(recipe), "--resume")
    assert done.returncode == 2 and "no checkpoint" in done.stderr and "Traceback" not in done.stderr
    assert not os.path.exists(tmp_path / "run" / "summary.json")
