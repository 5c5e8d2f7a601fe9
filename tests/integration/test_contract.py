"""The README's tables are a contract: each task's eval.json has exactly the keys the README lists."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sft_cli.commands import train as commands
from sft_cli.config.recipe import load_recipe
from sft_cli.config.schema import TASKS
from tests.conftest import (
    DOCS,
    REPO,
    TINY_BERT,
    TINY_UNET,
    build_tiny_image_classifier,
    keyword_rows,
    write_jsonl,
    write_recipe,
)
from tests.unit.test_speech import speech_values

pytestmark = pytest.mark.integration
FAST = {"max_steps": 2, "epochs": 1, "batch_size": 8, "warmup": 0.0, "log_every": 1}
ENGINE = {"device": "cpu", "precision": "fp32", "seed": 0}


def readme_table(heading: str) -> dict[str, set[str]]:
    """Rows of the README table under `heading`: each task named in the first cell -> the keys of the second."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split(heading, 1)[1]
    rows = {}
    for line in section.splitlines()[1:]:
        if rows and not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 2 and "`" in cells[0]:
            for task in re.findall(r"`([^`]+)`", cells[0]):
                rows[task] = set(re.findall(r"`([^`]+)`", cells[1]))
    return rows


def image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 255, (8, 8), dtype=np.uint8) // (1 if label == "a" else 4)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def recipes(tmp: Path, tiny_decoder: Path) -> dict[str, dict]:
    pairs = [{"prompt": f"name {i}", "response": f"value {i % 5}"} for i in range(24)]
    train = write_jsonl(tmp / "pairs.jsonl", pairs)
    choices = write_jsonl(tmp / "choices.jsonl", [{**p, "chosen": p["response"], "rejected": "none"} for p in pairs])
    texts = write_jsonl(tmp / "texts.jsonl", keyword_rows(40, 0))
    images = image_folder(tmp / "images")
    tiny = {"name": "minilm-l6", "from_scratch": True, "config": TINY_BERT}
    scored = write_jsonl(
        tmp / "scored.jsonl",
        [{**r, "score": len(r["text"]), "tags": r["text"].split()[:2]} for r in keyword_rows(40, 0)],
    )
    sentences = write_jsonl(
        tmp / "sentences.jsonl",
        [
            {"tokens": r["text"].split(), "tags": ["B-W" if len(w) > 5 else "O" for w in r["text"].split()]}
            for r in keyword_rows(40, 0)
        ],
    )
    context = "Alice went home. Bob stayed at work until late."
    questions = write_jsonl(
        tmp / "questions.jsonl",
        [{"question": "Who went home?", "context": context, "answers": {"text": ["Alice"], "answer_start": [0]}}] * 8
        + [{"question": "Who is Carol?", "context": context, "answers": {"text": [], "answer_start": []}}] * 4,
    )
    return {
        "regression": {
            "task": "regression",
            "backbone": tiny,
            "data": {"train": str(scored), "eval": str(scored), "label_field": "score", "max_length": 32},
        },
        "multi-label-classification": {
            "task": "multi-label-classification",
            "backbone": tiny,
            "data": {"train": str(scored), "eval": str(scored), "label_field": "tags", "max_length": 32},
        },
        "token-classification": {
            "task": "token-classification",
            "backbone": tiny,
            "data": {"train": str(sentences), "eval": str(sentences), "max_length": 32, "stride": 8},
        },
        "question-answering": {
            "task": "question-answering",
            "backbone": tiny,
            "data": {"train": str(questions), "eval": str(questions), "max_length": 32, "stride": 8},
        },
        "classification": {
            "task": "classification",
            "backbone": {"name": "minilm-l6", "from_scratch": True, "config": TINY_BERT},
            "data": {"train": str(texts), "eval": str(texts), "max_length": 32},
        },
        "image-classification": {
            "task": "image-classification",
            "backbone": {
                "arch": "resnet",
                "from_scratch": True,
                "config": {"embedding_size": 8, "hidden_sizes": [8], "depths": [1], "layer_type": "basic"},
            },
            "data": {"train": str(images), "eval": str(images), "image_size": 8},
        },
        "generation": {
            "task": "generation",
            "backbone": {"name": str(tiny_decoder)},
            "data": {"train": str(train), "eval": str(train), "max_length": 32},
            "eval": {"max_new_tokens": 4},
        },
        "preference": {
            "task": "preference",
            "backbone": {"name": str(tiny_decoder)},
            "data": {"train": str(choices), "eval": str(choices), "max_length": 32},
            "eval": {"max_new_tokens": 4},
        },
        "language-modeling": {
            "task": "language-modeling",
            "backbone": {"name": str(tiny_decoder)},
            "data": {"train": str(DOCS / "eval.txt"), "eval": str(DOCS / "eval.txt"), "max_length": 32},
        },
        "speech-recognition": {
            key: value for key, value in speech_values(tmp).items() if key in ("task", "backbone", "data")
        },
        "image-generation": {
            "task": "image-generation",
            "backbone": {"arch": "unet2d", "from_scratch": True, "config": TINY_UNET},
            "data": {"train": str(images), "eval": str(images)},
            "eval": {
                "num_samples": 4,
                "num_inference_steps": 2,
                "feature_model": str(build_tiny_image_classifier(tmp / "classifier", names=["a", "b"])),
            },
        },
    }


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory, tiny_decoder) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("contract")
    out = {}
    for task, values in recipes(tmp, tiny_decoder).items():
        values.update(name=task, schedule=FAST, engine=ENGINE, output={"dir": str(tmp / task)})
        recipe = load_recipe(write_recipe(tmp / f"{task}.yaml", values))
        command = "pretrain" if task == "language-modeling" else "finetune"
        commands.train(recipe, command, overwrite=True)
        commands.evaluate_model(recipe)
        out[task] = json.loads((tmp / task / "eval.json").read_text())
    return out


def test_the_readme_lists_every_task():
    assert set(readme_table("### `eval.json` keys")) == {
        "classification",
        "regression",
        "multi-label-classification",
        "token-classification",
        "question-answering",
        "image-classification",
        "generation",
        "language-modeling",
        "speech-recognition",
        "image-generation",
        "preference",
    }


@pytest.mark.parametrize("task", sorted(TASKS))
def test_eval_json_has_exactly_the_readme_keys(eval_files, task):
    promised = readme_table("### `eval.json` keys")[task]
    written = set(eval_files[task])
    assert written == promised, (
        f"written but not documented: {written - promised}; promised, missing: {promised - written}"
    )
    assert "loss" in written and not any(k.startswith("eval_") for k in written)
