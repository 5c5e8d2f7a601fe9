"""Find a run: RUN_OR_RECIPE (a run directory or a recipe file) -> its recipe, directory and model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from sft_cli.config.recipe import load_recipe
from sft_cli.config.schema import Recipe
from sft_cli.errors import SftError
from sft_cli.rundir.model_files import check_model_files


def resolve_run(target: Path, overrides: Optional[list[str]] = None) -> tuple[Recipe, Path]:
    """A run directory (its recipe.yaml) or a recipe file (its output.dir)."""
    if target.is_dir():
        if not (target / "recipe.yaml").is_file():
            raise SftError(
                f"RUN_OR_RECIPE: {target} has no recipe.yaml — pass a run directory (output.dir) or a recipe"
            )
        return load_recipe(target / "recipe.yaml", overrides), target
    if not target.is_file():
        raise SftError(f"RUN_OR_RECIPE: {target} is neither a run directory nor a recipe file")
    recipe = load_recipe(target, overrides)
    return recipe, Path(recipe.output.dir)


def model_directory(run_dir: Path, explicit: Optional[Path] = None) -> Path:
    """The trained model to use: --model DIR, else the run's model/."""
    directory = explicit or run_dir / "model"
    if not ((directory / "config.json").exists() or (directory / "adapter_config.json").exists()):
        hint = "pass --model DIR" if explicit else "train it first (`sft finetune`) or pass --model DIR"
        raise SftError(f"--model: no trained model in {directory} — {hint}")
    check_model_files(directory)
    return directory


def read_log(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file."""
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn or garbled line
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    return records
