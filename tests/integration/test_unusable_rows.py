"""Rows that cannot train (null text or label, unreadable images) are counted and reported, never silent."""

import json

import numpy as np
import pytest
from PIL import Image

from sft_cli.commands import train as commands
from sft_cli.commands.plan import plan
from sft_cli.config.recipe import load_recipe
from tests.conftest import keyword_rows, write_jsonl

pytestmark = pytest.mark.integration


def test_null_labels_and_texts_are_left_out_counted_in_plan_and_summary(tiny_recipe, tmp_path):
    rows = keyword_rows(64, 0)
    rows[3]["label"] = None
    rows[10]["label"] = None
    rows[20]["text"] = None
    train = write_jsonl(tmp_path / "with-nulls.jsonl", rows)
    recipe = load_recipe(tiny_recipe(data={"train": str(train), "max_length": 32}, schedule={"max_steps": 2}))
    info = plan(recipe)
    assert info["skipped_rows"] == 3 and info["train_examples"] == 61
    assert info["skipped_rows_by_split"]["data.train"] == {"null text": 1, "null label": 2}
    summary = commands.train(recipe, "finetune", overwrite=True)
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_rows"] == written["skipped_rows"] == 3
    assert written["skipped_rows_by_split"]["data.train"]["null label"] == 2


def test_unreadable_images_are_skipped_and_counted_when_asked(tmp_path):
    for label, shade in (("a", 30), ("b", 200)):
        (tmp_path / "img" / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8), shade + i, dtype=np.uint8)).save(tmp_path / "img" / label / f"{i}.png")
    (tmp_path / "img" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(
        "task: image-classification\n"
        "backbone: {arch: resnet, from_scratch: true, config: {hidden_sizes: [8], depths: [1], embedding_size: 8}}\n"
        f"data: {{train: {tmp_path / 'img'}, image_size: 8, skip_invalid: true}}\n"
        "schedule: {max_steps: 2, batch_size: 4}\n"
        "engine: {device: cpu, precision: fp32}\n"
        f"output: {{dir: {tmp_path / 'run'}}}\n"
    )
    summary = commands.train(load_recipe(recipe_path), "finetune")
    assert summary["skipped_rows"] == 1
    assert summary["skipped_rows_by_split"] == {"data.train": {"unreadable image": 1}}
