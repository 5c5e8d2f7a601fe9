"""Shared fixtures: tiny random-init configs, small deterministic data, recipe helpers."""

from __future__ import annotations

import functools
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on the two cores: one thread each (and in the sft processes they start),
    # since two workers of two threads each would fight over the cores
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

REPO = Path(__file__).resolve().parents[1]
TOPICS = REPO / "data" / "stdlib-topics"

# A 2-layer, 64-wide BERT built from MiniLM's config and tokenizer: trains in seconds.
TINY_BERT = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def keyword_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Sentences whose label is decided by one keyword: learnable by a tiny model in a few steps."""
    rng = random.Random(seed)
    filler = "the a report about this that with from our their system data value file".split()
    cues = {"positive": ["excellent", "wonderful", "great"], "negative": ["terrible", "awful", "broken"]}
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = rng.choices(filler, k=rng.randint(3, 12))
        words.insert(rng.randint(0, len(words)), rng.choice(cues[label]))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def recipe_values(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """A tiny classification recipe (random-init 2-layer BERT) as a dict; sections override."""
    train = write_jsonl(tmp_path / "data" / "train.jsonl", keyword_rows(256, 0))
    test = write_jsonl(tmp_path / "data" / "test.jsonl", keyword_rows(64, 1))
    values: dict[str, Any] = {
        "name": "tiny",
        "task": "classification",
        "backbone": {"name": "minilm-l6", "from_scratch": True, "config": dict(TINY_BERT)},
        "data": {"train": str(train), "eval": str(test), "max_length": 32},
        "optim": {"lr": 2e-3},
        "schedule": {"epochs": 6, "batch_size": 16, "warmup": 0.0, "log_every": 4},
        "engine": {"device": "cpu", "precision": "fp32", "seed": 0},
        "output": {"dir": str(tmp_path / "run")},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return values


def train_and_eval_in_process(recipe: Path, command: str = "finetune") -> None:
    """`sft finetune` (or pretrain) + `sft eval` in this process: the commands without an interpreter start."""
    from sft_cli.commands import train as commands
    from sft_cli.config.recipe import load_recipe

    commands.train(load_recipe(recipe), command)
    commands.evaluate_model(load_recipe(recipe))


def write_recipe(path: Path, values: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


@pytest.fixture
def tiny_recipe(tmp_path: Path):
    """Factory: tiny_recipe(**sections) -> path of a recipe YAML for a tiny random-init model."""

    def make(name: str = "recipe.yaml", **sections: Any) -> Path:
        return write_recipe(tmp_path / name, recipe_values(tmp_path, **sections))

    return make


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


DOCS = REPO / "data" / "python-docs"
# A 2-layer, 64-wide Llama with a 600-token BPE tokenizer trained on data/python-docs: a real decoder in a second.
TINY_LLAMA = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def build_tiny_decoder(directory: Path, arch: str = "llama", vocab_size: int = 600) -> Path:
    """Save a random-init decoder + its trained tokenizer as a model directory (a valid backbone.name)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sft_cli.tasks.text import train_bpe_tokenizer

    lines = [line for line in (DOCS / "train.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    tokenizer = train_bpe_tokenizer(lines[:3000], vocab_size)
    config = AutoConfig.for_model(
        arch,
        **(TINY_LLAMA if arch == "llama" else {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 256}),
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# 2-layer, 64-wide encoder-decoders with the same kind of 600-token tokenizer: T5 (relative positions, tied
# embeddings, decoder starts at pad) and BART (learned positions, final_logits_bias, decoder starts at EOS).
TINY_SEQ2SEQ = {
    "t5": {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4},
    "bart": {
        "d_model": 64,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 128,
        "decoder_ffn_dim": 128,
        "max_position_embeddings": 256,
    },
}


def build_tiny_seq2seq(directory: Path, arch: str = "t5", vocab_size: int = 600) -> Path:
    """Save a random-init encoder-decoder + a trained tokenizer as a model directory (a valid backbone.name)."""
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from sft_cli.tasks.text import train_bpe_tokenizer

    lines = [line for line in (DOCS / "train.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    tokenizer = train_bpe_tokenizer(lines[:3000], vocab_size)
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    start = tokenizer.pad_token_id if arch == "t5" else tokenizer.eos_token_id
    extra = (
        {"bos_token_id": tokenizer.bos_token_id, "forced_eos_token_id": tokenizer.eos_token_id}
        if arch == "bart"
        else {}
    )
    config = AutoConfig.for_model(
        arch, **TINY_SEQ2SEQ[arch], vocab_size=len(tokenizer), decoder_start_token_id=start, **ids, **extra
    )
    torch.manual_seed(0)
    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@functools.cache
def shared_tiny_seq2seq(arch: str) -> Path:
    """A tiny encoder-decoder built once per process, for tests that cannot take a fixture (bad-input cases)."""
    return build_tiny_seq2seq(Path(tempfile.mkdtemp(prefix=f"sft-tiny-{arch}-")) / "model", arch)


@pytest.fixture(scope="session")
def tiny_seq2seq(tmp_path_factory) -> dict[str, Path]:
    """{"t5": dir, "bart": dir}: tiny random-init encoder-decoders with tokenizers, built once per session."""
    root = tmp_path_factory.mktemp("tiny-seq2seq")
    return {arch: build_tiny_seq2seq(root / arch, arch) for arch in TINY_SEQ2SEQ}


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory) -> Path:
    """A tiny random-init Llama + tokenizer directory, built once per session."""
    return build_tiny_decoder(tmp_path_factory.mktemp("tiny-decoder") / "model")


@pytest.fixture(scope="session")
def long_decoder(tmp_path_factory, tiny_decoder) -> Path:
    """The tiny Llama with room for chat templates' long system prompts (4,096 positions)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("long-decoder")
    config = AutoConfig.from_pretrained(tiny_decoder)
    config.max_position_embeddings = 4096
    AutoModelForCausalLM.from_pretrained(tiny_decoder, config=config).save_pretrained(directory)
    return directory


def full_logits(task, batch):
    """The model's full logits for a collated batch, with the task's packed attention (the reference path)."""
    from sft_cli.model import backbone as bb

    inputs = task.attention_inputs(task.model, batch)
    return bb.unwrap(task.model)(input_ids=batch["input_ids"], use_cache=False, **inputs).logits


def invoke_cli(*args: str) -> str:
    """Run the CLI in this process (the same app and error path as `sft`); its stdout. Fails on a non-zero exit."""
    from typer.testing import CliRunner

    from sft_cli.cli import app, state

    state["debug"] = True
    result = CliRunner().invoke(app, list(args), env={"HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.stderr[-3000:]
    return result.stdout


def write_digit_folders(root: Path, classes: int = 3, per_class: int = 6, unlabeled: int = 48, test: int = 4) -> Path:
    """scikit-learn's 8x8 digits as image folders: unlabeled/ (flat), labeled/<digit>/, test/<digit>/ (disjoint)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts: dict[str, int] = {}
    wanted = {"labeled": per_class, "test": test}
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        image = Image.fromarray((pixels * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
        if label < classes:
            split = next((s for s in ("labeled", "test") if counts.get(f"{s}{label}", 0) < wanted[s]), None)
            if split is not None:
                counts[f"{split}{label}"] = counts.get(f"{split}{label}", 0) + 1
                (root / split / str(label)).mkdir(parents=True, exist_ok=True)
                image.save(root / split / str(label) / f"{index:04d}.png")
                continue
        if counts.get("unlabeled", 0) < unlabeled:
            counts["unlabeled"] = counts.get("unlabeled", 0) + 1
            (root / "unlabeled").mkdir(parents=True, exist_ok=True)
            image.save(root / "unlabeled" / f"{index:04d}.png")
    return root


# a UNet2DModel for 8x8 images in two resolutions: ~0.2M parameters, a step in a few milliseconds
TINY_UNET = {"block_out_channels": [32, 32], "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 8}


@pytest.fixture(scope="session")
def digit_folders(tmp_path_factory) -> Path:
    return write_digit_folders(tmp_path_factory.mktemp("digits"))


def diffusion_values(tmp: Path, digits: Path, **sections: Any) -> dict[str, Any]:
    """An image-generation recipe: a tiny UNet from scratch on 8x8 digits (pretraining on the unlabelled ones)."""
    values: dict[str, Any] = {
        "task": "image-generation",
        "backbone": {"arch": "unet2d", "from_scratch": True, "config": dict(TINY_UNET)},
        "data": {"train": str(digits / "unlabeled"), "eval": str(digits / "test")},
        "optim": {"lr": 2e-3, "weight_decay": 0.0},
        "schedule": {
            "epochs": 1000,
            "max_steps": 12,
            "batch_size": 16,
            "warmup": 0,
            "log_every": 4,
            "eval_every": "12",
        },
        "engine": {"device": "cpu", "precision": "fp32", "seed": 0},
        "eval": {"num_samples": 6, "num_inference_steps": 3, "batch_size": 16},
        "output": {"dir": str(tmp / "run")},
    }
    for key, value in sections.items():
        values[key] = (
            {**values[key], **value} if isinstance(value, dict) and isinstance(values.get(key), dict) else value
        )
    return values


def build_tiny_image_classifier(directory: Path, classes: int = 3, names: Optional[list[str]] = None) -> Path:
    """A random-init tiny ResNet digit classifier saved as sft saves one (its features are still a fixed map)."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    labels = {i: name for i, name in enumerate(names or [str(i) for i in range(classes)])}
    config = ResNetConfig(
        num_channels=1,
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        layer_type="basic",
        num_labels=len(labels),
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    ResNetForImageClassification(config).save_pretrained(directory)
    preprocess = {"image_size": 16, "channels": 1, "mean": [0.5], "std": [0.5]}
    (directory / "sft_preprocess.json").write_text(json.dumps(preprocess))
    return directory
