"""The training loop on a tiny random-init BERT: it learns, it is deterministic, accumulation is exact."""

from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed

from sft_cli.commands import train as commands
from sft_cli.config.recipe import load_recipe
from sft_cli.engine.accelerator import make_accelerator
from sft_cli.engine.trainer import Trainer
from sft_cli.tasks.registry import build_task
from tests.conftest import TINY_BERT, read_jsonl

NO_DROPOUT = {**TINY_BERT, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def build_trainer(path: Path) -> Trainer:
    recipe = load_recipe(path)
    accelerator = make_accelerator(recipe.engine)
    set_seed(recipe.engine.seed)
    task = build_task(recipe)
    task.setup(train=True)
    trainer = Trainer(
        task,
        accelerator,
        recipe.schedule,
        recipe.optim,
        recipe.engine,
        recipe.output,
        recipe.loss,
        Path(recipe.output.dir),
    )
    trainer.setup(None)
    return trainer


def train_losses(path: Path) -> list[float]:
    commands.train(load_recipe(path), "finetune")
    run = Path(load_recipe(path).output.dir)
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]


def test_loss_falls_and_every_trainable_parameter_changes(tiny_recipe):
    trainer = build_trainer(tiny_recipe())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit()
    losses = [r["loss"] for r in read_jsonl(trainer.run_dir / "metrics.jsonl") if "loss" in r]
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4
    unchanged = [n for n, p in trainer.model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    # MiniLM's vocabulary has ~30k rows; a keyword corpus touches a few, so embeddings are judged as a whole.
    unchanged = [n for n in unchanged if "word_embeddings" not in n]
    assert unchanged == []


def test_same_seed_gives_identical_losses(tiny_recipe, tmp_path):
    first = train_losses(tiny_recipe("a.yaml", output={"dir": str(tmp_path / "a")}))
    second = train_losses(tiny_recipe("b.yaml", output={"dir": str(tmp_path / "b")}))
    assert first == second and len(first) > 3


def test_other_seed_gives_other_losses(tiny_recipe, tmp_path):
    first = train_losses(tiny_recipe("a.yaml", output={"dir": str(tmp_path / "a")}))
    other = train_losses(
        tiny_recipe(
            "b.yaml", output={"dir": str(tmp_path / "b")}, engine={"device": "cpu", "precision": "fp32", "seed": 1}
        )
    )
    assert first != other


def test_accumulation_matches_a_larger_batch(tiny_recipe, tmp_path):
    common = {"epochs": 1, "warmup": 0.0, "log_every": 1, "group_by_length": False}
    backbone = {"name": "minilm-l6", "from_scratch": True, "config": NO_DROPOUT}
    big = train_losses(
        tiny_recipe(
            "big.yaml",
            backbone=backbone,
            schedule={**common, "batch_size": 8, "grad_accum": 1},
            output={"dir": str(tmp_path / "big")},
        )
    )
    small = train_losses(
        tiny_recipe(
            "small.yaml",
            backbone=backbone,
            schedule={**common, "batch_size": 4, "grad_accum": 2},
            output={"dir": str(tmp_path / "small")},
        )
    )
    assert len(big) == len(small) == 32
    assert small == pytest.approx(big, abs=1e-5)


def test_layer_lr_decay_and_no_decay_groups(tiny_recipe):
    from sft_cli.config.schema import OptimConfig
    from sft_cli.engine.optim import build_optimizer

    trainer = build_trainer(tiny_recipe())
    optimizer = build_optimizer(trainer.model, OptimConfig(lr=1.0, weight_decay=0.1, layer_lr_decay=0.5))
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    params = dict(trainer.model.named_parameters())
    assert group_of[id(params["classifier.weight"])]["lr"] == 1.0  # head: the top
    assert group_of[id(params["bert.encoder.layer.1.output.dense.weight"])]["lr"] == 0.5
    assert group_of[id(params["bert.encoder.layer.0.output.dense.weight"])]["lr"] == 0.25
    assert group_of[id(params["bert.embeddings.word_embeddings.weight"])]["lr"] == 0.125
    assert group_of[id(params["bert.encoder.layer.0.output.dense.bias"])]["weight_decay"] == 0.0
    assert group_of[id(params["bert.encoder.layer.0.output.LayerNorm.weight"])]["weight_decay"] == 0.0
    assert group_of[id(params["bert.encoder.layer.0.output.dense.weight"])]["weight_decay"] == 0.1


def test_compile_length_buckets_bound_the_number_of_shapes():
    """With engine.compile the batch lengths fall in a few power-of-two buckets (no recompile per length)."""
    from sft_cli.data.packing import pad_multiple

    assert [pad_multiple(n) for n in (1, 9, 17)] == [8, 16, 24]
    shapes = {pad_multiple(n, buckets=True) for n in range(1, 1025)}
    assert shapes == {16, 32, 64, 128, 256, 512, 1024}
    assert all(pad_multiple(n, buckets=True) >= n for n in range(1, 1025))
