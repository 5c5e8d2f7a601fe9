"""The user's view through the real CLI: plan, report, sweep, init."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sft_cli.config.recipe import load_recipe
from sft_cli.config.schema import TASKS
from tests.conftest import recipe_values, write_jsonl, write_recipe

pytestmark = pytest.mark.integration


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "sft_cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env={**__import__("os").environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_plan_parameter_counts_match_the_training_run(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_values(tmp_path, freeze={"policy": "last-n", "last_n": 1}))
    shown = cli("plan", str(recipe)).stdout
    cli("finetune", str(recipe))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert f"{summary['trainable_params']:,}" in shown and f"{summary['total_params']:,}" in shown
    assert "steps_per_epoch" in shown and "length_p90" in shown and "labels: negative 128, positive 128" in shown


def tiny_gpt_base(folder: Path) -> Path:
    from transformers import AutoConfig

    from sft_cli.tasks.text import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["open a file for reading and writing", "send bytes over a socket"] * 50, 300)
    tokenizer.save_pretrained(folder)
    AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer)).save_pretrained(folder)
    return folder


def test_plan_shows_the_masked_prompt_and_the_trained_response(tmp_path):
    base = tiny_gpt_base(tmp_path / "base")
    rows = [{"prompt": "open a file", "response": "io"}, {"prompt": "send bytes", "response": "socket"}] * 4
    values = recipe_values(
        tmp_path, task="generation", backbone={"name": str(base), "from_scratch": True, "config": {}}
    )
    values["data"] = {
        "train": str(write_jsonl(tmp_path / "g.jsonl", rows)),
        "template": "{prompt} =>",
        "max_length": 32,
    }
    shown = cli("plan", str(write_recipe(tmp_path / "g.yaml", values))).stdout
    assert "[no loss]open a file =>[trained]io<|endoftext|>" in shown  # masked prompt, then the trained response


def test_report_images_are_written_and_overlay_runs(tmp_path):
    from sft_cli.commands import train as commands
    from sft_cli.config.recipe import load_recipe

    for name in ("a", "b"):  # trained in this process; the report command itself runs as `sft report`
        recipe = write_recipe(tmp_path / f"{name}.yaml", recipe_values(tmp_path, output={"dir": str(tmp_path / name)}))
        commands.train(load_recipe(recipe), "finetune")
    commands.evaluate_model(load_recipe(tmp_path / "a.yaml"))
    single = tmp_path / "a" / "report.png"
    assert single.read_bytes()[:4] == b"\x89PNG" and single.stat().st_size > 20_000
    combined = tmp_path / "both.png"
    cli("report", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(combined))
    assert combined.read_bytes()[:4] == b"\x89PNG" and combined.stat().st_size > 20_000


def test_grid_sweep_finds_the_obviously_best_learning_rate(tmp_path):
    values = recipe_values(
        tmp_path, schedule={"epochs": 3, "batch_size": 16, "warmup": 0.0}, output={"dir": str(tmp_path / "sweep")}
    )
    values["sweep"] = {"optim.lr": [1e-7, 3e-3, 1e-6]}
    recipe = write_recipe(tmp_path / "s.yaml", values)
    shown = cli("sweep", str(recipe), "--trials", "3", "--sampler", "grid").stdout
    result = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert result["best_params"] == {"optim.lr": 3e-3} and len(result["trials"]) == 3
    assert load_recipe(tmp_path / "sweep" / "best-recipe.yaml").optim.lr == 3e-3
    assert "trial" in shown and (tmp_path / "sweep" / "trial-000" / "summary.json").exists()
    again = cli("sweep", str(recipe), "--trials", "3", "--sampler", "grid")  # finished sweeps resume, not restart
    assert (
        len(json.loads((tmp_path / "sweep" / "sweep.json").read_text())["trials"]) == 3
        and "Traceback" not in again.stderr
    )


@pytest.mark.parametrize("task", TASKS)
def test_init_writes_a_recipe_that_validates(tmp_path, task):
    target = tmp_path / f"{task}.yaml"
    cli("init", task, "-o", str(target))
    recipe = load_recipe(target)
    assert recipe.task == task and yaml.safe_load(target.read_text())["task"] == task
    assert target.read_text().startswith(f"# sft {'pretrain' if task == 'language-modeling' else 'finetune'} {target}")
