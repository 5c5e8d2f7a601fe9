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


# -- sft predict --------------------------------------------------------------------------------------------


def test_predict_on_the_quickstart_test_file_gives_the_eval_accuracy_in_input_order(trained_run):
    tmp, recipe = trained_run
    full = str(TOPICS / "test.jsonl")
    out = tmp / "predictions-full.jsonl"
    done = sft("predict", str(tmp / "run"), "--input", full, "--output", str(out), "predict.batch_size=8", cwd=tmp)
    assert done.returncode == 0, done.stderr[-2000:]
    evaluated = sft(
        "eval",
        str(recipe),
        f"data.eval={full}",
        "output.dir=" + str(tmp / "eval-full"),
        "--model",
        str(tmp / "run" / "model"),
        cwd=tmp,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    rows, source = read_jsonl(out), read_jsonl(TOPICS / "test.jsonl")
    assert [r["text"] for r in rows] == [r["text"] for r in source]  # input order, although batches were length-sorted
    assert [len(r["text"]) for r in source] != sorted(len(r["text"]) for r in source)
    assert all(r["label"] == s["label"] for r, s in zip(rows, source))  # the input's own fields stay as they were
    accuracy = sum(r["prediction"] == r["label"] for r in rows) / len(rows)
    assert accuracy == json.loads((tmp / "eval-full" / "eval.json").read_text())["accuracy"]
    for row in rows:
        assert len(row["scores"]) == 5 and row["scores"][row["prediction"]] == row["score"] == max(
            row["scores"].values()
        )
        assert 0 < sum(row["scores"].values()) <= 1.0001


def test_predict_killed_midway_then_resumed_writes_every_row_exactly_once(trained_run):
    import os
    import signal
    import time

    tmp, _ = trained_run
    source = read_jsonl(TOPICS / "test.jsonl")
    out = tmp / "resumed.jsonl"
    args = [sys.executable, "-m", "sft_cli", "predict", str(tmp / "run"), "--input", str(TOPICS / "test.jsonl")]
    args += ["--output", str(out), "predict.batch_size=2"]
    process = subprocess.Popen(args, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 32):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    partial = out.read_bytes().count(b"\n")
    assert 32 <= partial < len(source), partial  # killed midway
    done = sft(
        "predict",
        str(tmp / "run"),
        "--input",
        str(TOPICS / "test.jsonl"),
        "--output",
        str(out),
        "--resume",
        "predict.batch_size=2",
        cwd=tmp,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_jsonl(out)
    assert [r["text"] for r in rows] == [r["text"] for r in source]  # every row once, in order


def test_predict_refuses_to_clobber_and_names_a_missing_column(trained_run, tmp_path):
    tmp, _ = trained_run
    existing = tmp / "predictions-full.jsonl"
    done = sft("predict", str(tmp / "run"), "--input", str(TOPICS / "test.jsonl"), "--output", str(existing), cwd=tmp)
    assert done.returncode == 2 and "--resume" in done.stderr and "Traceback" not in done.stderr
    other = write_jsonl(tmp_path / "other.jsonl", [{"sentence": "hello"}])
    done = sft("predict", str(tmp / "run"), "--input", str(other), cwd=tmp)
    assert done.returncode == 2 and "data.text_field='text'" in done.stderr and done.stderr.count("\n") == 1


def test_model_card_and_export_load_without_sft(trained_run, tmp_path):
    tmp, _ = trained_run
    card = (tmp / "run" / "model" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert {"base_model", "library_name", "pipeline_tag", "tags"} <= set(front)
    assert (
        front["pipeline_tag"] == "text-classification"
        and front["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    )
    assert "accuracy" in card  # the metrics of eval.json
    done = sft("export", str(tmp / "run"), "--to", str(tmp_path / "export"), "--dtype", "fp32", cwd=tmp)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "export" / "model.safetensors").exists() and (tmp_path / "export" / "README.md").exists()
    script = (
        "import sys, torch\n"
        "from transformers import pipeline, AutoModelForSequenceClassification, AutoTokenizer\n"
        "d = sys.argv[1]\n"
        "tok = AutoTokenizer.from_pretrained(d); model = AutoModelForSequenceClassification.from_pretrained(d).eval()\n"
        "with torch.no_grad(): print(model(**tok(['open a socket to the server'], return_tensors='pt')).logits.tolist())\n"
        "print(pipeline('text-classification', model=d)('open a socket to the server')[0]['label'])\n"
    )
    exported = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "export")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert exported.returncode == 0, exported.stderr[-2000:]
    theirs = json.loads(exported.stdout.splitlines()[0])
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp / "run" / "model")
    model = AutoModelForSequenceClassification.from_pretrained(tmp / "run" / "model").eval()
    with torch.no_grad():
        ours = model(**tokenizer(["open a socket to the server"], return_tensors="pt")).logits.tolist()
    assert theirs[0] == pytest.approx(ours[0], abs=1e-5)
    assert exported.stdout.splitlines()[1] == model.config.id2label[int(torch.tensor(ours).argmax())]
