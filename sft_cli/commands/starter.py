"""`sft init TASK`: a commented starter recipe, generated from the schema so it never drifts from it."""

from __future__ import annotations

import dataclasses

from omegaconf import OmegaConf

from sft_cli.config.schema import TASKS, Recipe
from sft_cli.errors import SftError
from sft_cli.tasks.specs import TASK_SPECS


def starter_recipe(task: str, path: str) -> str:
    """YAML for `task` with every key and its default, each section headed by its schema docstring."""
    if task not in TASKS:
        raise SftError(f"TASK: '{task}' is not one of {', '.join(TASKS)}")
    command = TASK_SPECS[task].command
    config = OmegaConf.merge(
        OmegaConf.structured(Recipe),
        {"name": task, "task": task, "output": {"dir": f"runs/{task}"}},
        TASK_SPECS[task].starter,
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
