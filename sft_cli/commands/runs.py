"""`sft runs`: one row per run directory — status, steps, time, the task's main metric — for many runs at once.

Status comes from the run lock (a live holder: `running`), `status.json` (written by `sft finetune` /
`sft pretrain` as the run starts and ends) and what is on disk: a run killed with -9 that left a checkpoint is
`interrupted` (resumable), one that left none is `failed`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

from sft_cli.errors import SftError
from sft_cli.rundir.atomic import read_json_object, write_json_atomic
from sft_cli.rundir.checkpoints import list_checkpoints
from sft_cli.rundir.lock import holder
from sft_cli.tasks.specs import TASK_SPECS

log = logging.getLogger("sft")
STATUS_FILE = "status.json"
STATUSES = ("finished", "interrupted", "running", "failed", "unreadable")
COLUMNS = ("dir", "name", "task", "status", "step", "train_s", "metric", "value", "tokens_per_s")


def write_status(run_dir: Path, status: str, **extra: Any) -> None:
    """Record how a training run stands (rank 0 only)."""
    write_json_atomic(run_dir / STATUS_FILE, {"status": status, **extra})


def _last_records(path: Path) -> tuple[Optional[dict], Optional[dict]]:
    """The last training record and the last evaluation record of metrics.jsonl (garbled lines skipped)."""
    train = evaluation = None
    try:
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    except (OSError, ValueError):
        lines = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        if "loss" in record:
            train = record
        if any(str(k).startswith("eval_") for k in record):
            evaluation = record
    return train, evaluation


def _number(value: Any) -> Optional[float]:
    """A finite number, else None (a garbled file must not put a string into a numeric column)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def status_of(run_dir: Path) -> str:
    """finished | interrupted | running | failed."""
    if holder(run_dir) is not None:
        return "running"
    recorded = read_json_object(run_dir / STATUS_FILE).get("status")
    if recorded in ("finished", "interrupted", "failed"):
        return recorded
    if recorded is None and (run_dir / "summary.json").is_file():
        return "finished"
    return "interrupted" if list_checkpoints(run_dir / "checkpoints") else "failed"  # killed, or never got far


def describe(run_dir: Path, name: Optional[str] = None) -> dict[str, Any]:
    """One row of the table for a run directory; `unreadable` when its files are garbage."""
    try:
        return _describe(run_dir, name)
    except Exception as err:  # one broken directory must not hide the others
        log.debug("sft runs: %s is unreadable: %s", run_dir, err)
        return _unreadable(run_dir, name)


def _unreadable(run_dir: Path, name: Optional[str]) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update({"dir": str(run_dir), "name": name or run_dir.name, "task": "?", "status": "unreadable"})
    return row


def _describe(run_dir: Path, name: Optional[str]) -> dict[str, Any]:
    import yaml

    try:
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        recipe = None
    if not isinstance(recipe, dict):
        return _unreadable(run_dir, name)
    task = recipe.get("task") if isinstance(recipe.get("task"), str) else "?"
    summary = read_json_object(run_dir / "summary.json")
    train, evaluation = _last_records(run_dir / "metrics.jsonl")
    metric = TASK_SPECS[task].headline_metric if task in TASK_SPECS else "loss"
    value = _number(read_json_object(run_dir / "eval.json").get(metric))
    if value is None and evaluation is not None:
        value = _number(evaluation.get(f"eval_{metric}"))
    step = _number(summary.get("steps")) or _number((train or evaluation or {}).get("step"))
    return {
        "dir": str(run_dir),
        "name": name or str(recipe.get("name") or run_dir.name),
        "task": task,
        "status": status_of(run_dir),
        "step": step,
        "train_s": _number(summary.get("train_seconds")),
        "metric": metric,
        "value": value,
        "tokens_per_s": _number(summary.get("tokens_per_s")) or _number((train or {}).get("tokens_per_s")),
    }


def find_runs(roots: list[Path]) -> list[tuple[Path, str]]:
    """Run directories under the given roots (a run itself, its children, and sweep trials)."""
    found: list[tuple[Path, str]] = []
    for root in roots:
        if not root.is_dir():
            raise SftError(f"DIR: {root} is not a directory — pass run directories or a folder of them")
        for candidate in [root] + _subdirectories(root):
            if (candidate / "recipe.yaml").exists():
                found.append((candidate, ""))
            for trial in _subdirectories(candidate, "trial-*"):  # a sweep's trials
                if (trial / "recipe.yaml").exists():
                    found.append((trial, f"{candidate.name}/{trial.name}"))
    return list(dict.fromkeys(found))


def _subdirectories(directory: Path, pattern: str = "*") -> list[Path]:
    """Sub-directories matching a pattern, sorted; none when the directory cannot be listed."""
    try:
        return sorted(p for p in directory.glob(pattern) if p.is_dir())
    except OSError:
        return []


def table_rows(roots: list[Path], sort: str = "dir", descending: bool = False) -> list[dict[str, Any]]:
    """Every run's row, sorted by a column (missing values last)."""
    if sort not in COLUMNS:
        raise SftError(f"--sort: '{sort}' is not a column ({', '.join(COLUMNS)})")
    rows = [describe(path, name or None) for path, name in find_runs(roots)]
    present = [r for r in rows if r[sort] is not None]
    present.sort(key=lambda r: r[sort], reverse=descending)
    return present + [r for r in rows if r[sort] is None]


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    """rows as table | md | csv | json text."""
    from sft_cli.ui.progress import human

    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    cells = [[human(r[c]) if c not in ("dir", "name") else str(r[c]) for c in COLUMNS] for r in rows]
    if fmt == "md":
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells]) + "\n"
    raise SftError(f"--format: '{fmt}' is not one of table, md, csv, json")
