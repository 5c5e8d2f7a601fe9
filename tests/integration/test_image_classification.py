"""Image classification through the real CLI on a tiny random ResNet and generated images."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sft_cli.config.recipe import load_recipe
from sft_cli.tasks.image_classification import ImageClassificationTask
from tests.conftest import write_jsonl

pytestmark = pytest.mark.integration
TINY_RESNET = {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"}


def stripes(kind: str, size: int, mode: str, rng: np.random.Generator) -> Image.Image:
    """Horizontal or vertical stripes with noise, as grayscale or RGB, at any size."""
    grid = np.indices((size, size))[0 if kind == "horizontal" else 1]
    pixels = ((grid // 2) % 2 * 200 + rng.integers(0, 40, (size, size))).astype(np.uint8)
    image = Image.fromarray(pixels, mode="L")
    return image.convert("RGB") if mode == "RGB" else image


def make_rows(folder: Path, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        kind = "horizontal" if i % 2 else "vertical"
        image = stripes(kind, int(rng.integers(12, 20)), "RGB" if i % 3 else "L", rng)
        image.save(folder / f"{i}.png")
        rows.append({"path": f"{folder.name}/{i}.png", "label": kind})
    return rows


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("images")
    train = write_jsonl(tmp / "train.jsonl", make_rows(tmp / "train", 48, 0))
    test = write_jsonl(tmp / "test.jsonl", make_rows(tmp / "test", 16, 1))
    recipe = tmp / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "task": "image-classification",
                "backbone": {"arch": "resnet", "from_scratch": True, "config": TINY_RESNET},
                "data": {
                    "train": str(train),
                    "eval": str(test),
                    "image_field": "path",
                    "image_size": 16,
                    "mean": [0.5, 0.5, 0.5],
                    "std": [0.5, 0.5, 0.5],
                    "augment": {"random_crop_padding": 2, "horizontal_flip": True},
                },
                "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                "schedule": {"epochs": 8, "batch_size": 8, "warmup": 0.0},
                "engine": {"precision": "fp32"},
                "output": {"dir": str(tmp / "run")},
            }
        )
    )
    for command in ("finetune", "eval"):
        done = subprocess.run(
            [sys.executable, "-m", "sft_cli", command, str(recipe)], capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-2000:]
    return tmp, recipe


def test_finetune_and_eval_write_metrics_and_a_confusion_matrix(image_run):
    tmp, _ = image_run
    metrics = json.loads((tmp / "run" / "eval.json").read_text())
    assert metrics["num_examples"] == 16 and set(metrics["per_class"]) == {"horizontal", "vertical"}
    assert metrics["accuracy"] >= 0.75
    png = tmp / "run" / "confusion_matrix.png"
    assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"


def test_saved_model_reloads_with_the_same_predictions(image_run):
    from transformers import AutoModelForImageClassification

    tmp, recipe_path = image_run
    recipe = load_recipe(recipe_path)
    task = ImageClassificationTask(recipe)
    task.setup(model_dir=str(tmp / "run" / "model"), train=False)
    batch = task.collate([task.eval_set[i] for i in range(len(task.eval_set))], train=False)
    model = AutoModelForImageClassification.from_pretrained(tmp / "run" / "model").eval()
    with torch.inference_mode():
        predicted = model(pixel_values=batch["pixel_values"]).logits.argmax(-1)
    accuracy = (predicted == batch["labels"]).float().mean().item()
    metrics = json.loads((tmp / "run" / "eval.json").read_text())
    assert accuracy == pytest.approx(metrics["accuracy"])
    assert model.config.id2label[0] in ("horizontal", "vertical")


def test_augmentation_changes_training_pixels_only(image_run):
    tmp, recipe_path = image_run
    task = ImageClassificationTask(load_recipe(recipe_path))
    task.setup(model_dir=str(tmp / "run" / "model"), train=False)
    rows = [task.eval_set[i] for i in range(8)]
    torch.manual_seed(0)
    eval_a, eval_b = task.collate(rows, train=False)["pixel_values"], task.collate(rows, train=False)["pixel_values"]
    train_a, train_b = task.collate(rows, train=True)["pixel_values"], task.collate(rows, train=True)["pixel_values"]
    assert torch.equal(eval_a, eval_b)
    assert not torch.equal(train_a, eval_a) and not torch.equal(train_a, train_b)
    assert train_a.shape == eval_a.shape == (8, 3, 16, 16)


def test_predict_on_a_digits_folder_matches_eval(tmp_path):
    """sft predict over an image folder: one row per image, its path and folder label kept, eval's accuracy."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for split, indices in (("train", range(0, 300)), ("test", range(1500, 1560))):
        for i in indices:
            folder = tmp_path / "digits" / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((digits.images[i] * 16).astype(np.uint8)).save(folder / f"{i}.png")
    recipe = tmp_path / "digits.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "task": "image-classification",
                "backbone": {"arch": "resnet", "from_scratch": True, "config": TINY_RESNET},
                "data": {
                    "train": str(tmp_path / "digits" / "train"),
                    "eval": str(tmp_path / "digits" / "test"),
                    "image_size": 8,
                },
                "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
                "schedule": {"epochs": 3, "batch_size": 32},
                "engine": {"device": "cpu", "precision": "fp32"},
                "output": {"dir": str(tmp_path / "run")},
            }
        )
    )
    for args in (("finetune", str(recipe)), ("eval", str(recipe))):
        done = subprocess.run([sys.executable, "-m", "sft_cli", *args], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "digits-predictions.jsonl"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sft_cli",
            "predict",
            str(tmp_path / "run"),
            "--input",
            str(tmp_path / "digits" / "test"),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 60 and all(
        Path(r["image"]).is_file() and Path(r["image"]).parent.name == r["label"] for r in rows
    )
    accuracy = sum(r["prediction"] == r["label"] for r in rows) / len(rows)
    assert accuracy == json.loads((tmp_path / "run" / "eval.json").read_text())["accuracy"]
    assert all(set(r["scores"]) <= {str(d) for d in range(10)} and len(r["scores"]) == 5 for r in rows)
