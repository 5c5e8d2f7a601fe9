"""Faults: non-finite loss, failed writes, and random recipes never produce a traceback."""

import errno
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sft_cli.config.recipe import Recipe, load_recipe
from sft_cli.errors import SftError
from sft_cli.rundir import atomic
from sft_cli.rundir import checkpoints as checkpoint
from tests.unit.test_engine import build_trainer


def poison(trainer, at_call: int):
    """Make the task's loss NaN on one forward call."""
    original = trainer.task.loss_terms
    calls = {"n": 0}

    def loss_terms(model, batch):
        calls["n"] += 1
        terms = original(model, batch)
        if calls["n"] == at_call:
            summed, count = terms["sup"]
            terms["sup"] = (summed * float("nan"), count)
        return terms

    trainer.task.loss_terms = loss_terms


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tiny_recipe):
    trainer = build_trainer(tiny_recipe(output={"save_every": 2}))
    poison(trainer, at_call=5)
    with pytest.raises(SftError, match="at step 5") as err:
        trainer.fit()
    assert "skip_nonfinite" in str(err.value)
    saved = checkpoint.list_checkpoints(trainer.run_dir / "checkpoints")
    assert [p.name for p in saved][-1] == "step-00000004"
    assert (saved[-1] / "model" / "weights.safetensors").exists()


def test_skip_nonfinite_skips_and_counts(tiny_recipe):
    trainer = build_trainer(
        tiny_recipe(engine={"device": "cpu", "precision": "fp32", "seed": 0, "skip_nonfinite": True})
    )
    poison(trainer, at_call=3)
    summary = trainer.fit()
    assert summary["skipped_nonfinite"] == 1 and summary["steps"] == 96
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    def write_model(target: Path) -> None:
        target.mkdir()
        (target / "weights.safetensors").write_text("ok")

    first = checkpoint.save_checkpoint(tmp_path, 1, {"a": torch.zeros(1)}, write_model)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(SftError, match="No space left on device.*previous copy is intact"):
        checkpoint.save_checkpoint(tmp_path, 2, {"a": torch.zeros(1)}, write_model)
    assert checkpoint.list_checkpoints(tmp_path) == [first]
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_atomic_json_write_never_leaves_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    atomic.write_json_atomic(target, {"old": 1})

    def broken_fsync(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(checkpoint.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        atomic.write_json_atomic(target, {"new": 2})
    assert yaml.safe_load(target.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_trust_remote_code_is_off_by_default():
    assert Recipe().backbone.trust_remote_code is False


scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=8))
keys = st.sampled_from(
    ["task", "optim", "lr", "schedule", "batch_size", "data", "train", "freeze", "policy", "x", "${a}", "name"]
)
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)
override_text = st.text(alphabet=st.sampled_from(list("abdeilmnoprst._=[]{}${}:0123456789-")), max_size=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=documents, overrides=st.lists(override_text, max_size=3))
def test_random_recipes_give_a_recipe_or_one_line_error(tmp_path, document, overrides):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        recipe = load_recipe(path, overrides)
    except SftError as err:
        assert "\n" not in str(err) and str(err)
    else:
        assert isinstance(recipe, Recipe)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(list("abcdelnoprst:{}[]-, \n\t'\"&*!%@`|>#0123456789.$=")), max_size=60))
def test_random_yaml_text_gives_a_recipe_or_one_line_error(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text("data: {train: t.jsonl}\n" + text)
    try:
        load_recipe(path)
    except SftError as err:
        assert "\n" not in str(err) and str(err)
