"""`sft init TASK`: a commented starter recipe, generated from the schema so it never drifts from it."""

from __future__ import annotations

import dataclasses

from omegaconf import OmegaConf

from sft_cli.errors import SftError
from sft_cli.schema import TASKS, Recipe

STARTERS = {
    "classification": {
        "data": {"train": "data/train.jsonl", "eval": "data/test.jsonl", "text_field": "text", "label_field": "label"},
    },
    "image-classification": {
        "backbone": {"name": "path/to/vision-model", "arch": "resnet", "from_scratch": False},
        "data": {
            "train": "data/images/train",
            "eval": "data/images/test",
            "image_size": 224,
            "augment": {"random_crop_padding": 4, "horizontal_flip": True},
        },
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    },
    "generation": {
        "backbone": {"name": "runs/tiny-gpt-pretrain/model"},
        "data": {"train": "data/train.jsonl", "eval": "data/test.jsonl", "template": "{prompt} =>", "packing": True},
    },
    "language-modeling": {
        "objective": "clm",
        "backbone": {"arch": "gpt2", "from_scratch": True, "config": {"n_layer": 4, "n_embd": 256, "n_head": 4}},
        "tokenizer": {"train": True, "vocab_size": 8000},
        "data": {"train": "data/corpus.txt", "eval": "data/corpus-eval.txt", "max_length": 128},
    },
}


def starter_recipe(task: str, path: str) -> str:
    """YAML for `task` with every key and its default, each section headed by its schema docstring."""
    if task not in TASKS:
        raise SftError(f"TASK: '{task}' is not one of {', '.join(TASKS)}")
    command = "pretrain" if task == "language-modeling" else "finetune"
    config = OmegaConf.merge(
        OmegaConf.structured(Recipe), {"name": task, "task": task, "output": {"dir": f"runs/{task}"}}, STARTERS[task]
    )
    lines = [
        f"# sft {command} {path} && sft eval {path}",
        f"# Starter recipe for `{task}`: every key with its default.",
        "",
    ]
    for field in dataclasses.fields(Recipe):
        value = config[field.name]
        if dataclasses.is_dataclass(field.type if not isinstance(field.type, str) else None) or OmegaConf.is_config(
            value
        ):
            doc = (getattr(Recipe.__dataclass_fields__[field.name].default_factory, "__doc__", "") or "").strip()
            if doc and not doc.startswith(("dict(", "Built-in")):
                lines.append(f"# {doc.splitlines()[0]}")
            lines.append(OmegaConf.to_yaml({field.name: value}).rstrip())
        else:
            lines.append(OmegaConf.to_yaml({field.name: value}).rstrip())
    return "\n".join(lines) + "\n"
