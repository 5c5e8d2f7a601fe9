"""Which files in a run directory sft wrote: `.sft-manifest.json`, so nothing else is ever deleted.

Every file sft publishes into `output.dir` (recipe, logs, models, checkpoints, reports) is recorded here,
by path relative to the run directory, when it is written. `--overwrite` removes exactly those files (and
the directories they leave empty); a directory that is not empty and has no manifest is not an sft run,
and a file in a path sft writes that the manifest does not list belongs to someone else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from sft_cli.errors import SftError
from sft_cli.rundir.atomic import write_json_atomic
from sft_cli.rundir.lock import LOCK_FILE

MANIFEST = ".sft-manifest.json"
# What a run (and `sft eval` / `sft predict` with their default outputs) writes at the top of output.dir.
RUN_PATHS = (
    "recipe.yaml",
    "metrics.jsonl",
    "summary.json",
    "eval.json",
    "model",
    "best-model",
    "checkpoints",
    "report.png",
    "status.json",
    "confusion_matrix.png",
    "predictions.jsonl",
    "tensorboard",
)
OWN_HIDDEN = (MANIFEST, LOCK_FILE)  # sft's own bookkeeping, never a user file


def _read(run_dir: Path) -> list[str]:
    try:
        files = json.loads((run_dir / MANIFEST).read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [f for f in files if isinstance(f, str)]


def is_sft_run(run_dir: Path) -> bool:
    """True when the directory carries a manifest (an sft run wrote it)."""
    return (run_dir / MANIFEST).is_file()


def owned(run_dir: Path) -> set[str]:
    """Relative paths of the files sft wrote here."""
    return set(_read(run_dir))


def _files_under(path: Path) -> Iterable[Path]:
    if path.is_dir() and not path.is_symlink():
        for root, _, names in os.walk(path):
            for name in names:
                yield Path(root) / name
    elif path.exists() or path.is_symlink():
        yield path


def record(run_dir: Path, *paths: Path) -> None:
    """Add the files now at `paths` (files or whole directories) to the manifest; a path not there yet is a
    file about to be written (metrics.jsonl before its first line)."""
    files = set(_read(run_dir))
    for path in paths:
        found = list(_files_under(path)) or [path]
        files.update(p.relative_to(run_dir).as_posix() for p in found)
    write_json_atomic(run_dir / MANIFEST, {"files": sorted(files)})


def forget(run_dir: Path, *paths: Path) -> None:
    """Drop `paths` (and everything under them) from the manifest, after sft removed them."""
    prefixes = [p.relative_to(run_dir).as_posix() for p in paths]
    kept = [f for f in _read(run_dir) if not any(f == p or f.startswith(p + "/") for p in prefixes)]
    write_json_atomic(run_dir / MANIFEST, {"files": kept})


def foreign(run_dir: Path, names: Iterable[str] = RUN_PATHS) -> list[Path]:
    """Files under the paths sft writes (`names`) that sft did not write."""
    mine = owned(run_dir)
    found = []
    for name in names:
        for path in _files_under(run_dir / name):
            relative = path.relative_to(run_dir).as_posix()
            if relative not in mine and not Path(relative).name.startswith((".tmp-", ".old-", ".del-")):
                found.append(path)
    return found


def other_entries(run_dir: Path) -> list[str]:
    """Top-level names in the directory other than sft's own bookkeeping."""
    if not run_dir.is_dir():
        return []
    return sorted(
        p.name for p in run_dir.iterdir() if p.name not in OWN_HIDDEN and not p.name.startswith(".write-test-")
    )


def refuse_foreign(run_dir: Path, names: Iterable[str] = RUN_PATHS) -> None:
    """Stop before any compute when a path this command writes (`names`) holds files sft did not write."""
    found = foreign(run_dir, names)
    if found:
        shown = ", ".join(str(p.relative_to(run_dir)) for p in found[:3]) + (" ..." if len(found) > 3 else "")
        raise SftError(
            f"output.dir: {run_dir} holds files sft did not write where this command writes ({shown}) — move "
            "them, or set output.dir to another directory (--overwrite only replaces an sft run's own files)"
        )


def remove_owned(run_dir: Path) -> None:
    """Delete the files the manifest lists, then the directories that leaves empty; nothing else."""
    files = _read(run_dir)
    for relative in files:
        path = run_dir / relative
        if path.is_file() or path.is_symlink():
            path.unlink()
    for relative in sorted({str(Path(f).parent) for f in files}, key=lambda p: -p.count("/")):
        directory = run_dir / relative
        while directory != run_dir and directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
            directory = directory.parent
    (run_dir / MANIFEST).unlink(missing_ok=True)
