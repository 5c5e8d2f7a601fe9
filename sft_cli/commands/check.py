"""`sft check`: a CI smoke test of recipes, in seconds, before a GPU hour is spent.

For each recipe: validate it; read every row of each local data source (up to ~100 MB; the first rows of
larger ones); build the backbone and tokenizer; run a few optimizer steps on a handful of examples and one
tiny evaluation, on CPU by default — all inside a temporary directory that is removed. A recipe whose backbone
is another checked recipe's output (`runs/chat-base/model`) is checked after it, on its freshly checked model.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from sft_cli.config.recipe import load_recipe
from sft_cli.config.schema import Recipe
from sft_cli.data.mixture import sources
from sft_cli.data.tables import DataCache
from sft_cli.environment import hub_offline
from sft_cli.errors import SftError
from sft_cli.tasks.specs import TASK_SPECS

FULL_READ_BYTES = 100 * 2**20  # local files up to this size are read whole
SAMPLE_ROWS = 32  # examples a smoke run trains on
EVAL_ROWS = 8


def _is_hub(location: Optional[str]) -> bool:
    from sft_cli.data.tables import HUB_ID
    from sft_cli.model.backbone import embedded_aliases

    if not location or location in embedded_aliases() or Path(location).expanduser().exists():
        return False
    return bool(HUB_ID.match(location)) and not location.startswith((".", "/", "~"))


def needs_hub(recipe: Recipe) -> Optional[str]:
    """Why the recipe needs the network (offline), or None."""
    if not hub_offline():
        return None
    spec = recipe.backbone
    if not (spec.from_scratch and spec.arch) and _is_hub(spec.name) and "/" in spec.name:
        return f"needs the hub for backbone {spec.name} (HF_HUB_OFFLINE is set)"
    for key in ("train", "eval", "unlabeled"):
        location = getattr(recipe.data, key)
        if _is_hub(location) and not Path(location).suffix:
            return f"needs the hub for data.{key} {location} (HF_HUB_OFFLINE is set)"
    return None


def sample_indices(table: Any, rows: int, label_field: Optional[str]) -> list[int]:
    """Every label's first row (so a label the eval split has and training lacks is still caught), then rows
    spread evenly over the file (files are often sorted by label or source)."""
    import numpy as np

    picks: dict[int, None] = {}
    if label_field and label_field in table.column_names:
        first: dict[Any, int] = {}
        for index, label in enumerate(table[label_field]):
            first.setdefault(label, index)
        picks.update(dict.fromkeys(sorted(first.values())[:256]))
    spread = np.linspace(0, len(table) - 1, num=min(rows, len(table))).round().astype(int).tolist()
    picks.update(dict.fromkeys(spread))
    return sorted(picks)[: max(rows, len(picks))]


def _sample(
    location: str,
    key: str,
    rows: int,
    target: Path,
    label_field: Optional[str] = None,
    cache: DataCache = DataCache(),
    audio_field: Optional[str] = None,
) -> str:
    """Read the source (whole up to FULL_READ_BYTES), keep a spread of its rows as a saved dataset for the smoke run."""
    import datasets

    from sft_cli.data.tables import load_table

    path = Path(location).expanduser()
    if audio_field is not None:  # audio paths made absolute: the sample is saved elsewhere than the data file
        from sft_cli.data.audio import load_audio_rows

        table = load_audio_rows(location, key, audio_field, cache)
    elif path.is_file() and path.stat().st_size > FULL_READ_BYTES:
        builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
        stream = datasets.load_dataset(
            builder.get(path.suffix.lower(), "json"), data_files=str(path), split="train", streaming=True
        )
        table = datasets.Dataset.from_list(list(stream.take(rows)))
    else:
        table = load_table(location, key, cache)
    table.select(sample_indices(table, rows, label_field)).save_to_disk(str(target))
    return str(target)


def smoke_recipe(
    recipe: Recipe, work: Path, steps: int, device: str, models: dict[Path, Path], cache: DataCache = DataCache()
) -> Recipe:
    """The recipe shrunk to a smoke run: sampled data, a few steps, tiny batches, output in `work`."""
    data = recipe.data
    labels = data.label_field if recipe.task in ("classification", "image-classification") else None
    mix = sources(data)
    sampled: dict[str, Any] = {
        key: _sample(
            getattr(data, key),
            f"data.{key}",
            EVAL_ROWS if key == "eval" else SAMPLE_ROWS,
            work / key,
            labels if key != "unlabeled" else None,
            cache,
            data.audio_field if recipe.task == "speech-recognition" else None,
        )
        for key in ("train", "eval", "unlabeled")
        if getattr(data, key) and not (key == "train" and mix)
    }
    if mix:  # each source sampled apart, its own keys kept (and num_samples capped to the sample)
        sampled["train"] = [
            {
                **entry,
                "path": _sample(s.path, s.key, SAMPLE_ROWS, work / f"train-{s.index}", None, cache),
                **({"num_samples": min(s.num_samples, SAMPLE_ROWS)} if s.num_samples else {}),
            }
            for s, entry in zip(mix, data.train)
        ]
    backbone = recipe.backbone
    produced = models.get(Path(backbone.name).expanduser().resolve())
    if produced is not None:  # built by a recipe checked before this one
        backbone = replace(backbone, name=str(produced))
    engine = recipe.engine
    if device == "cpu":
        precision = "auto" if engine.precision == "fp16" else engine.precision
        engine = replace(engine, device="cpu", precision=precision, num_workers=0, compile=False)
    schedule = replace(
        recipe.schedule,
        max_steps=steps,
        epochs=max(recipe.schedule.epochs, 1),
        batch_size=min(recipe.schedule.batch_size, 4),
        eval_every="epoch",
        early_stopping=None,
    )
    return replace(
        recipe,
        backbone=backbone,
        data=replace(data, **sampled),
        schedule=schedule,
        engine=engine,
        output=replace(recipe.output, dir=str(work / "run"), save_every=None, tensorboard=False, report_to=[]),
        eval=replace(
            recipe.eval,
            batch_size=min(recipe.eval.batch_size, EVAL_ROWS),
            max_new_tokens=4,
            num_samples=min(recipe.eval.num_samples, 8),  # image generation: a few images, a few sampler steps
            num_inference_steps=min(recipe.eval.num_inference_steps, 2),
            feature_model=_produced(recipe.eval.feature_model, models),
        ),
    )


def _produced(location: Optional[str], models: dict[Path, Path]) -> Optional[str]:
    """A model path another checked recipe produced, as that check's smoke model (else unchanged)."""
    if not location:
        return location
    produced = models.get(Path(location).expanduser().resolve())
    return str(produced) if produced is not None else location


def check_one(
    path: Path, overrides: list[str], steps: int, device: str, work: Path, models: dict[Path, Path]
) -> dict[str, Any]:
    """Check one recipe; returns its row (name, task, status, seconds, error)."""
    from sft_cli.commands import train as commands

    started = time.perf_counter()
    row: dict[str, Any] = {"recipe": str(path), "name": path.stem, "task": None, "status": "pass", "error": None}
    try:
        recipe = load_recipe(path, overrides)
        row.update(name=recipe.name, task=recipe.task)
        reason = needs_hub(recipe)
        if reason:
            row.update(status="skipped", error=reason)
        else:
            work.mkdir(parents=True)
            scratch = work / "cache"  # parsed and tokenized samples stay in the check's own directory
            smoke = smoke_recipe(recipe, work, steps, device, models, DataCache(str(scratch)))
            commands.train(smoke, TASK_SPECS[recipe.task].command, overwrite=True, scratch_cache=scratch)
            if smoke.data.eval:
                commands.evaluate_model(smoke, scratch_cache=scratch)
            models[(Path(recipe.output.dir).expanduser().resolve() / "model")] = work / "run" / "model"
    except SftError as err:
        row.update(status="fail", error=" ".join(str(err).split()))
    except Exception as err:  # a bug (in sft, or a model that fails in a way we do not catch): still one row
        last = traceback.extract_tb(err.__traceback__)[-1]
        row.update(
            status="fail",
            error=f"internal error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} ({Path(last.filename).name}:{last.lineno})",
        )
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def order_by_dependency(paths: list[Path], overrides: list[str]) -> list[Path]:
    """Recipes that produce another's backbone come first (stable otherwise)."""
    produces, needs = {}, {}
    for path in paths:
        try:
            recipe = load_recipe(path, overrides)
        except SftError:
            continue  # reported when checked
        produces[path] = Path(recipe.output.dir).expanduser().resolve() / "model"
        needs[path] = {
            Path(name).expanduser().resolve() for name in (recipe.backbone.name, recipe.eval.feature_model) if name
        }
    ordered: list[Path] = []

    def visit(path: Path, trail: tuple = ()) -> None:
        if path in ordered or path in trail:
            return
        for other in paths:
            if other != path and produces.get(other) in needs.get(path, set()):
                visit(other, trail + (path,))
        ordered.append(path)

    for path in paths:
        visit(path)
    return ordered


def check(paths: list[Path], overrides: list[str], steps: int = 2, device: str = "cpu") -> list[dict[str, Any]]:
    """Check every recipe, in dependency order; rows come back in that order."""
    import shutil

    if steps < 1:
        raise SftError("--steps: must be >= 1")
    if device not in ("cpu", "auto"):
        raise SftError(f"--device: '{device}' is not cpu or auto")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SftError(f"RECIPE: not found: {', '.join(missing)}")
    root = Path(tempfile.mkdtemp(prefix="sft-check-"))
    models: dict[Path, Path] = {}
    try:
        return [
            check_one(p, overrides, steps, device, root / f"{i:03d}", models)
            for i, p in enumerate(order_by_dependency(paths, overrides))
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)
