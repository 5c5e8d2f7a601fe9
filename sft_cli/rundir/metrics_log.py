"""The run's metric log, metrics.jsonl: one JSON object per line, optionally mirrored to experiment trackers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Optional


class MetricLog:
    """Appends one JSON object per line to metrics.jsonl; the source of truth for reports."""

    def __init__(self, path: Path, enabled: bool = True, mirror: Optional[Callable[[dict[str, Any]], None]] = None):
        self.path = path
        self.enabled = enabled
        self.mirror = mirror  # the run's experiment trackers (output.report_to)

    def write(self, record: dict[str, Any]) -> None:
        """Append a record (flushed at once so a killed run keeps its log); mirror it to the trackers."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")
        if self.mirror is not None:
            self.mirror(record)

    def truncate_after(self, step: int) -> None:
        """On resume, drop records written after the checkpoint's step (they will be redone)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text(errors="replace").splitlines() if _step_of(line) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))


def _step_of(line: str) -> float:
    """A metrics.jsonl line's step; a torn or garbled line (a kill mid-write) sorts after every step."""
    try:
        record = json.loads(line)
        return float(record.get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return math.inf
