"""Two processes on CPU (gloo) through the real CLI: same losses as one process, one set of outputs."""

import json
import subprocess
import sys

import pytest

from tests.conftest import (
    TINY_BERT,
    keyword_rows,
    read_jsonl,
    recipe_values,
    train_and_eval_in_process,
    write_jsonl,
    write_recipe,
)

pytestmark = pytest.mark.integration
NO_DROPOUT = {**TINY_BERT, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
TOLERANCE = 1e-4  # gloo all-reduce sums in another order than one process does (fp32)
# Under precision auto this CPU trains in bf16 autocast, whose matmuls round at ~3 significant digits: with
# transformers 5.25 the one-process run itself differs between two runs by 4e-5 at step 29, and two processes
# from one by 1.5e-4 (the same at the previous commit). Two uncoordinated copies differ by orders more.
TOLERANCES = {"cpu": TOLERANCE, "default": 1e-3}


def run(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "sft_cli", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


# `cpu`: what the tests always used. `default`: no engine keys at all, as a new user writes it (device auto,
# precision auto) — the case that trained two uncoordinated copies before.
ENGINES = {"cpu": {"device": "cpu", "precision": "fp32", "seed": 0}, "default": {"seed": 0}}


@pytest.fixture(scope="module", params=sorted(ENGINES))
def runs(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"ddp-{request.param}")
    odd = write_jsonl(tmp / "odd.jsonl", keyword_rows(33, 1))  # odd: a sampler would pad a duplicate
    out = {"engine": request.param}
    for name, nproc, batch in (("one", 1, 16), ("two", 2, 8)):
        values = recipe_values(
            tmp,
            backbone={"name": "minilm-l6", "from_scratch": True, "config": NO_DROPOUT},
            schedule={"epochs": 2, "batch_size": batch, "warmup": 0.0, "log_every": 1, "group_by_length": False},
            output={"dir": str(tmp / name), "save_every": 5},
        )
        values["engine"] = ENGINES[request.param]
        values["data"]["eval"] = str(odd)
        recipe = write_recipe(tmp / f"{name}.yaml", values)
        if nproc == 1:  # the reference run, in this process (saves two interpreter starts)
            train_and_eval_in_process(recipe)
        else:
            run("finetune", str(recipe), "--nproc", str(nproc))
            run("eval", str(recipe), "--nproc", str(nproc))
        out[name] = tmp / name
    return out


def test_two_processes_match_one_with_the_same_global_batch(runs):
    one = [r for r in read_jsonl(runs["one"] / "metrics.jsonl") if "loss" in r]
    two = [r for r in read_jsonl(runs["two"] / "metrics.jsonl") if "loss" in r]
    assert len(one) == len(two) == 32
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=TOLERANCES[runs["engine"]])
    assert [r["loss_sup"] for r in two] == pytest.approx([r["loss"] for r in two], abs=1e-6)  # not 1/world of it
    assert [r["epoch"] for r in two] == [r["epoch"] for r in one]
    s1, s2 = (json.loads((runs[n] / "summary.json").read_text()) for n in ("one", "two"))
    assert s1["num_processes"] == 1 and s2["num_processes"] == 2
    assert s2["train_tokens"] == s1["train_tokens"]


def test_every_logged_step_is_written_once(runs):
    records = read_jsonl(runs["two"] / "metrics.jsonl")
    train_steps = [r["step"] for r in records if "loss" in r]
    eval_steps = [r["step"] for r in records if "eval_loss" in r]
    assert len(train_steps) == len(set(train_steps)) == 32
    assert len(eval_steps) == len(set(eval_steps)) == 2


def test_one_set_of_outputs(runs):
    names = sorted(p.name for p in runs["two"].iterdir())
    assert names == sorted(p.name for p in runs["one"].iterdir())
    assert len(read_jsonl(runs["two"] / "metrics.jsonl")) == len(read_jsonl(runs["one"] / "metrics.jsonl"))


def test_eval_over_two_ranks_counts_every_example_once(runs):
    metrics = json.loads((runs["two"] / "eval.json").read_text())
    assert metrics["num_examples"] == 33
    assert sum(map(sum, metrics["confusion_matrix"])) == 33
    single = json.loads((runs["one"] / "eval.json").read_text())
    assert metrics["accuracy"] == pytest.approx(single["accuracy"], abs=1 / 33 + 1e-9)


def test_resume_under_two_processes(runs, tmp_path):
    if runs["engine"] != "cpu":
        pytest.skip("resume under two processes is covered once, with engine.device: cpu")
    recipe = runs["two"].parent / "two.yaml"
    done = run("finetune", str(recipe), "schedule.epochs=3", "--resume", "--nproc", "2")
    assert "Traceback" not in done.stderr
    summary = json.loads((runs["two"] / "summary.json").read_text())
    assert summary["steps"] == 48
