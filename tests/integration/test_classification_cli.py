"""`sft finetune` + `sft eval` through the real CLI on the packaged MiniLM and real sentences."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import TOPICS, read_jsonl, write_jsonl

pytestmark = pytest.mark.integration


def sft(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sft_cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cls")
    train = write_jsonl(tmp / "train.jsonl", read_jsonl(TOPICS / "train.jsonl")[:480])
    test = write_jsonl(tmp / "test.jsonl", read_jsonl(TOPICS / "test.jsonl")[:160])
    recipe = tmp / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "it",
                "task": "classification",
                "backbone": {"name": "minilm-l6"},
                "data": {"train": str(train), "eval": str(test), "max_length": 48},
                "optim": {"lr": 1e-4},
                "schedule": {"epochs": 3, "batch_size": 16},
                "output": {"dir": str(tmp / "run")},
            }
        )
    )
    done = sft("finetune", str(recipe), "engine.seed=7", cwd=tmp)
    assert done.returncode == 0, done.stderr[-2000:]
    evaluated = sft("eval", str(recipe), cwd=tmp)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    return tmp, recipe


def test_run_directory_contract(trained_run):
    tmp, _ = trained_run
    run = tmp / "run"
    for name in (
        "recipe.yaml",
        "metrics.jsonl",
        "summary.json",
        "eval.json",
        "model/config.json",
        "confusion_matrix.png",
    ):
        assert (run / name).exists(), name
    summary = json.loads((run / "summary.json").read_text())
    for key in (
        "train_seconds",
        "train_tokens",
        "tokens_per_s",
        "peak_rss_mb",
        "trainable_params",
        "total_params",
        "final_train_loss",
    ):
        assert summary[key] is not None, key
    assert summary["trainable_params"] == summary["total_params"] > 20_000_000
    assert yaml.safe_load((run / "recipe.yaml").read_text())["engine"]["seed"] == 7  # the override is recorded


def test_accuracy_beats_majority_class_by_a_wide_margin(trained_run):
    tmp, _ = trained_run
    metrics = json.loads((tmp / "run" / "eval.json").read_text())
    labels = [r["label"] for r in read_jsonl(tmp / "test.jsonl")]
    majority = Counter(labels).most_common(1)[0][1] / len(labels)
    assert metrics["num_examples"] == len(labels)
    assert metrics["accuracy"] > majority + 0.3, (metrics["accuracy"], majority)
    assert metrics["macro_f1"] > 0.5
    assert sum(map(sum, metrics["confusion_matrix"])) == len(labels)
    assert set(metrics["per_class"]) == set(labels)


def test_saved_model_reloads_and_predicts_the_same(trained_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tmp, _ = trained_run
    model_dir = tmp / "run" / "model"
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = read_jsonl(tmp / "test.jsonl")
    with torch.inference_mode():
        enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=48, padding=True, return_tensors="pt")
        predicted = model(**enc).logits.argmax(-1).tolist()
    names = [model.config.id2label[i] for i in predicted]
    accuracy = sum(n == r["label"] for n, r in zip(names, rows)) / len(rows)
    metrics = json.loads((tmp / "run" / "eval.json").read_text())
    assert accuracy == pytest.approx(metrics["accuracy"], abs=1.5 / len(rows))


def test_user_error_is_one_line_exit_2(trained_run):
    tmp, recipe = trained_run
    done = sft("finetune", str(recipe), "optim.lrr=1", cwd=tmp)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "did you mean 'optim.lr'" in done.stderr
    assert "Traceback" not in done.stderr


def test_finished_run_is_not_overwritten(trained_run):
    tmp, recipe = trained_run
    summary = (tmp / "run" / "summary.json").read_bytes()
    done = sft("finetune", str(recipe), cwd=tmp)
    assert done.returncode == 2 and "--overwrite" in done.stderr
    assert (tmp / "run" / "summary.json").read_bytes() == summary
