"""`sft pretrain` (through the real CLI) then generative `sft finetune` on tiny models and real text."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, read_jsonl, train_and_eval_in_process, write_jsonl

pytestmark = pytest.mark.integration
DOCS = REPO / "data" / "python-docs"
NAMES = REPO / "data" / "docstring-names"
TINY_GPT = {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 128}


def sft(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "sft_cli", *args], cwd=cwd, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def write(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    recipe = write(
        tmp / "pretrain.yaml",
        {
            "name": "tiny-pretrain",
            "task": "language-modeling",
            "backbone": {"arch": "gpt2", "from_scratch": True, "config": TINY_GPT},
            "tokenizer": {"train": True, "vocab_size": 1000},
            "data": {"train": str(DOCS / "train.txt"), "eval": str(DOCS / "eval.txt"), "max_length": 64},
            "optim": {"lr": 2e-3, "weight_decay": 0.0},
            "schedule": {"epochs": 3, "batch_size": 32, "warmup": 0.05, "scheduler": "cosine"},
            "output": {"dir": str(tmp / "run")},
        },
    )
    sft("pretrain", str(recipe), cwd=tmp)
    sft("eval", str(recipe), cwd=tmp)
    return tmp


def test_pretraining_lowers_perplexity_well_below_untrained(pretrained):
    summary = json.loads((pretrained / "run" / "summary.json").read_text())
    before = summary["initial_eval"]["eval_perplexity"]
    after = json.loads((pretrained / "run" / "eval.json").read_text())["perplexity"]
    assert before > 500  # about the vocabulary size: an untrained model guesses uniformly
    assert after < before / 4, (before, after)


def test_pretrained_model_loads_with_its_trained_tokenizer(pretrained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(pretrained / "run" / "model")
    tokenizer = AutoTokenizer.from_pretrained(pretrained / "run" / "model")
    assert len(tokenizer) == model.config.vocab_size == 1000
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


def sft_recipe(tmp: Path, name: str, backbone: dict, **data) -> Path:
    train = write_jsonl(tmp / "sft-train.jsonl", read_jsonl(NAMES / "train.jsonl")[:300])
    test = write_jsonl(tmp / "sft-test.jsonl", read_jsonl(NAMES / "test.jsonl")[:80])
    return write(
        tmp / f"{name}.yaml",
        {
            "name": name,
            "task": "generation",
            "backbone": backbone,
            "data": {"train": str(train), "eval": str(test), "template": "{prompt} =>", "max_length": 64, **data},
            "optim": {"lr": 5e-4, "weight_decay": 0.0},
            "schedule": {"epochs": 10, "batch_size": 16, "warmup": 0.05, "scheduler": "cosine"},
            "eval": {"max_new_tokens": 24},
            "output": {"dir": str(tmp / name)},
        },
    )


@pytest.fixture(scope="module")
def sft_runs(pretrained):
    model = str(pretrained / "run" / "model")
    runs = {}
    for name, from_scratch in (("sft-pretrained", False), ("sft-scratch", True)):
        recipe = sft_recipe(pretrained, name, {"name": model, "from_scratch": from_scratch}, packing=True)
        train_and_eval_in_process(
            recipe
        )  # the pretraining above went through the real CLI; these save four interpreter starts
        runs[name] = json.loads((pretrained / name / "eval.json").read_text())
    return runs


def test_sft_from_pretrained_beats_sft_from_random_init(sft_runs):
    pretrained, scratch = sft_runs["sft-pretrained"], sft_runs["sft-scratch"]
    # The method's claim, on a small labeled set: unsupervised pretraining makes supervised learning better.
    assert pretrained["loss"] < scratch["loss"] - 0.05, (pretrained["loss"], scratch["loss"])


def test_generation_metrics_and_predictions_file(pretrained, sft_runs):
    metrics = sft_runs["sft-pretrained"]
    for key in ("exact_match", "bleu", "rouge_l", "loss", "num_examples"):
        assert key in metrics
    assert metrics["num_examples"] == 80
    predictions = read_jsonl(pretrained / "sft-pretrained" / "predictions.jsonl")
    assert len(predictions) == 80 and {"prompt", "reference", "prediction"} <= set(predictions[0])
    assert metrics["exact_match"] >= sft_runs["sft-scratch"]["exact_match"]
    assert metrics["rouge_l"] > sft_runs["sft-scratch"]["rouge_l"]


def test_eos_is_learned_so_generation_stops(pretrained, sft_runs):
    predictions = read_jsonl(pretrained / "sft-pretrained" / "predictions.jsonl")
    # an untrained model never emits EOS; after SFT most answers end with it well inside the budget
    assert sum(p["stopped"] for p in predictions) / len(predictions) > 0.8
