"""`task: preference` through the CLI on a tiny Llama: DPO raises held-out reward accuracy; eval, predict, plan and
export work as for generation; a bad pair is one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import invoke_cli, read_jsonl, write_jsonl, write_recipe

pytestmark = pytest.mark.integration
PREFS = Path(__file__).resolve().parents[2] / "data" / "stdlib-prefs"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_decoder):
    tmp = tmp_path_factory.mktemp("preference")
    train = write_jsonl(tmp / "train.jsonl", read_jsonl(PREFS / "train.jsonl")[:96])
    test = write_jsonl(tmp / "test.jsonl", read_jsonl(PREFS / "test.jsonl")[:32])
    values = {
        "name": "dpo",
        "task": "preference",
        "backbone": {"name": str(tiny_decoder)},
        "data": {"train": str(train), "eval": str(test), "chat_template": "chatml", "max_length": 128},
        "loss": {"preference": "dpo", "beta": 0.5},
        "optim": {"lr": 3e-3},
        "schedule": {"epochs": 2, "batch_size": 8, "warmup": 0.0, "log_every": 4},
        "eval": {"max_new_tokens": 6},
        "engine": {"device": "cpu", "precision": "fp32", "seed": 0},
        "output": {"dir": str(tmp / "run")},
    }
    recipe = write_recipe(tmp / "dpo.yaml", values)
    invoke_cli("finetune", str(recipe))
    invoke_cli("eval", str(recipe))
    return tmp, recipe


def test_dpo_raises_held_out_reward_accuracy_from_the_reference(run):
    tmp, _ = run
    evals = [r for r in read_jsonl(tmp / "run" / "metrics.jsonl") if "eval_reward_accuracy" in r]
    start, end = evals[0], evals[-1]
    assert start["step"] == 0 and start["eval_reward_margin"] == 0.0  # the policy starts as the reference
    assert start["eval_loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2
    assert end["eval_reward_accuracy"] >= 0.6 and end["eval_reward_margin"] > 0.05
    assert end["eval_loss"] < start["eval_loss"]
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    assert {k: v for k, v in summary["preference"].items() if k != "reference_seconds"} == {
        "loss": "dpo",
        "reference": "precompute",
        "layout": "shared-prompt",
        "sft_weight": 0.0,
    }


def test_eval_reports_rewards_and_generates_for_the_prompts(run):
    tmp, _ = run
    metrics = json.loads((tmp / "run" / "eval.json").read_text())
    for key in ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"):
        assert isinstance(metrics[key], float)
    assert metrics["chosen_logps"] > metrics["rejected_logps"]
    assert metrics["num_examples"] == 32 and "exact_match" in metrics and "bleu" in metrics
    evals = [r for r in read_jsonl(tmp / "run" / "metrics.jsonl") if "eval_reward_accuracy" in r]
    assert metrics["reward_accuracy"] == pytest.approx(evals[-1]["eval_reward_accuracy"])  # same reference
    predictions = read_jsonl(tmp / "run" / "predictions.jsonl")
    assert len(predictions) == 32 and predictions[0]["messages"][-1]["role"] == "user"
    assert predictions[0]["reference"] == read_jsonl(PREFS / "test.jsonl")[0]["chosen"][0]["content"]


def test_predict_plan_and_export_work_as_for_generation(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp, recipe = run
    rows = write_jsonl(tmp / "ask.jsonl", read_jsonl(PREFS / "test.jsonl")[:3])  # the pairs' own prompts (messages)
    invoke_cli("predict", str(tmp / "run"), "--input", str(rows), "--output", str(tmp / "out.jsonl"))
    assert [isinstance(r["prediction"], str) for r in read_jsonl(tmp / "out.jsonl")] == [True] * 3
    plan = invoke_cli("plan", str(recipe))
    assert "pairs: 96" in plan and "reference: precompute" in plan and "[chosen, scored]" in plan
    invoke_cli("export", str(tmp / "run"), "--to", str(tmp / "export"))
    model = AutoModelForCausalLM.from_pretrained(tmp / "export")
    tokenizer = AutoTokenizer.from_pretrained(tmp / "export")
    assert model.config.vocab_size >= len(tokenizer) and "<|im_start|>" in tokenizer.chat_template


def test_a_pair_with_identical_completions_is_one_line_exit_2(run):
    tmp, recipe = run
    bad = write_jsonl(tmp / "bad.jsonl", [{"prompt": "Which module?", "chosen": "os", "rejected": "os"}])
    result = subprocess.run(
        [sys.executable, "-m", "sft_cli", "finetune", str(recipe), f"data.train={bad}", f"output.dir={tmp / 'bad'}"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and "bad.jsonl row 1" in message[0] and "identical" in message[0]
    assert "Traceback" not in result.stderr


def test_kill_9_then_resume_gives_the_uninterrupted_losses(tmp_path, tiny_decoder):
    """The reference log-probabilities are part of the run's data: a resumed run reads the same ones back."""

    from tests.integration.test_schedules_resume import whole_and_resumed_losses

    train = write_jsonl(tmp_path / "train.jsonl", read_jsonl(PREFS / "train.jsonl")[:96])

    def recipe(name: str) -> Path:
        values = {
            "name": name,
            "task": "preference",
            "backbone": {"name": str(tiny_decoder)},
            "data": {"train": str(train), "chat_template": "chatml", "max_length": 96},
            "loss": {"preference": "dpo", "beta": 0.5},
            "optim": {"lr": 3e-3},
            "schedule": {"max_steps": 36, "batch_size": 8, "warmup": 0.0, "log_every": 1},
            "engine": {"device": "cpu", "precision": "fp32", "seed": 0},
            "output": {"dir": str(tmp_path / name), "save_every": 6, "keep": 2},
        }
        return write_recipe(tmp_path / f"{name}.yaml", values)

    losses = whole_and_resumed_losses("finetune", recipe("whole"), recipe("killed"), 12)
    assert len(losses[0]) == 36 and losses[1] == pytest.approx(losses[0], abs=1e-6)
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["preference"]["reference_seconds"] < 1.0  # read back from the run's data cache, not recomputed
