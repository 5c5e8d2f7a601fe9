"""The loss mix L = w_sup·L_sup + λ·L_lm, and masked-LM pretraining on a tiny BERT."""

import json
from pathlib import Path

import torch

from sft_cli.commands import train as commands
from sft_cli.config.recipe import load_recipe
from sft_cli.tasks.lm_aux import mask_tokens
from tests.conftest import read_jsonl


def run(path: Path, command: str = "finetune") -> list[dict]:
    recipe = load_recipe(path)
    commands.train(recipe, command)
    return read_jsonl(Path(recipe.output.dir) / "metrics.jsonl")


def train_records(records: list[dict]) -> list[dict]:
    return [r for r in records if "loss" in r]


def test_lambda_zero_is_exactly_the_supervised_run(tiny_recipe, tmp_path):
    plain = train_records(run(tiny_recipe("a.yaml", output={"dir": str(tmp_path / "a")})))
    zero = train_records(run(tiny_recipe("b.yaml", loss={"lm": 0.0}, output={"dir": str(tmp_path / "b")})))
    assert [r["loss"] for r in plain] == [r["loss"] for r in zero]
    assert "loss_lm" not in zero[0]


def test_lambda_positive_logs_both_terms_and_both_fall(tiny_recipe, tmp_path):
    # A small λ: on a from-scratch 2-layer encoder a large MLM term swamps the shared weights at first.
    records = train_records(
        run(
            tiny_recipe(
                loss={"lm": 0.05},
                schedule={"epochs": 20, "batch_size": 16, "warmup": 0.0, "log_every": 4, "max_grad_norm": None},
            )
        )
    )
    first, last = records[0], records[-1]
    assert {"loss", "loss_sup", "loss_lm"} <= set(first)
    assert last["loss_lm"] < first["loss_lm"] and last["loss_sup"] < first["loss_sup"]
    assert abs(first["loss"] - (first["loss_sup"] + 0.05 * first["loss_lm"])) < 1e-3


def test_mlm_masking_is_15_percent_with_80_10_10():
    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (64, 256))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    inputs, labels = mask_tokens(ids, special, mask_id=3, vocab_size=1000)
    chosen = labels != -100
    assert abs(chosen.float().mean().item() - 0.15) < 0.01
    assert not chosen[:, 0].any()
    assert abs((inputs[chosen] == 3).float().mean().item() - 0.8) < 0.03
    assert abs((inputs[chosen] == ids[chosen]).float().mean().item() - 0.1) < 0.03


def test_mlm_pretraining_of_a_tiny_bert_lowers_loss_and_reloads(tiny_recipe, tmp_path):
    from transformers import AutoModelForMaskedLM

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(f"the {w} reads a file and writes the {w} to a socket" for w in ["report", "value", "data"] * 40)
        + "\n"
    )
    path = tiny_recipe(
        task="language-modeling",
        data={"train": str(corpus), "eval": str(corpus), "max_length": 32},
        schedule={"epochs": 3, "batch_size": 8, "warmup": 0.0, "log_every": 5},
    )
    records = run(path, "pretrain")
    evals = [r for r in records if "eval_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 1.0
    model_dir = tmp_path / "run" / "model"
    assert AutoModelForMaskedLM.from_pretrained(model_dir).config.model_type == "bert"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["initial_eval"]["eval_perplexity"] > summary["eval"]["eval_perplexity"]


def test_unlabeled_corpus_feeds_the_lm_term(tiny_recipe, tmp_path):
    corpus = tmp_path / "unlabeled.txt"
    corpus.write_text(
        "\n".join(f"an unlabeled line about {w} and files" for w in ["sockets", "paths", "numbers"] * 30) + "\n"
    )
    records = train_records(
        run(
            tiny_recipe(
                loss={"lm": 0.05},
                data={
                    "unlabeled": str(corpus),
                    "train": str(tmp_path / "data" / "train.jsonl"),
                    "eval": str(tmp_path / "data" / "test.jsonl"),
                    "max_length": 32,
                },
                schedule={"epochs": 2, "batch_size": 16, "warmup": 0.0, "log_every": 2},
            )
        )
    )
    assert "loss_lm" in records[0] and records[-1]["loss_lm"] < records[0]["loss_lm"]
