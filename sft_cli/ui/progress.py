"""rich progress bar for training and the tables printed at the end of a command."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)
stdout = Console()
_QUIET = {"on": False}


def json_mode() -> TextIO:
    """`--json`: everything meant for people goes to stderr; stdout keeps one JSON document.

    Returns the stream for that document. Libraries that print to stdout (DeepSpeed's logger, compiler output
    of extensions) would corrupt it, so file descriptor 1 itself is pointed at stderr where it is a real file.
    """
    sys.stdout.flush()
    stdout.file = sys.stderr
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # an in-memory stdout (tests): nothing below Python writes there
        document, sys.stdout = sys.stdout, sys.stderr
        return document
    document = os.fdopen(os.dup(fd), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), fd)
    return document


@contextmanager
def quiet() -> Iterator[None]:
    """No progress bars, progress lines or tables for a while (`sft check` runs many trainings)."""
    _QUIET["on"] = True
    try:
        yield
    finally:
        _QUIET["on"] = False


def bars_wanted() -> bool:
    """Live progress bars only on a terminal, and never with NO_COLOR set."""
    return console.is_terminal and not os.environ.get("NO_COLOR")


class TrainProgress:
    """step/total, loss, lr, tokens/s and ETA; silent on non-main processes."""

    def __init__(self, total: int, enabled: bool = True):
        self.enabled = enabled
        self.total = total
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled or not bars_wanted(),
        )
        self.enabled = enabled and not _QUIET["on"]
        self.task_id = None

    def start(self, completed: int) -> None:
        if self.enabled:
            self.progress.start()
            self.task_id = self.progress.add_task(
                "train", total=self.total, completed=completed, loss="-", lr="-", tps="-"
            )

    def update(self, step: int, record: Mapping[str, Any]) -> None:
        if self.task_id is None:
            return
        fields = {
            "loss": f"{record['loss']:.4f}" if "loss" in record else "-",
            "lr": f"{record['lr']:.2e}",
            "tps": f"{record['tokens_per_s']:,.0f}",
        }
        self.progress.update(self.task_id, completed=step, **fields)
        if self.progress.disable:  # not a terminal (CI, pipes): one plain line per log record
            console.print(
                f"step {step}/{self.total}  loss {fields['loss']}  lr {fields['lr']}  {fields['tps']} tok/s",
                highlight=False,
            )

    def stop(self) -> None:
        if self.task_id is not None:
            self.progress.stop()


def human(value: Any) -> str:
    """A number as people read it: thousands separators, sensible decimals, '—' for none."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        magnitude = abs(value)
        if value != value or magnitude == float("inf"):
            return str(value)
        if magnitude == 0:
            return "0"
        if magnitude >= 1e9:
            return f"{value:.3e}"
        if magnitude >= 1e4:
            return f"{value:,.0f}"
        if magnitude >= 100:
            return f"{value:,.1f}"
        if magnitude >= 1:
            return f"{value:.3f}"
        return f"{value:.4f}" if magnitude >= 1e-3 else f"{value:.2e}"
    return str(value)


def print_table(title: str, values: Mapping[str, Any]) -> None:
    """A two-column table of scalar results, formatted for people (the JSON files keep raw values)."""
    if _QUIET["on"]:
        return
    table = Table(title=title, show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", justify="right")
    for key, value in values.items():
        if isinstance(value, (int, float, str)) or value is None:
            table.add_row(key, human(value))
    stdout.print(table)


def print_per_class(per_class: Mapping[str, Mapping[str, float]]) -> None:
    """Per-class precision/recall/F1/support."""
    if _QUIET["on"]:
        return
    table = Table(title="per class")
    for column in ("label", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "label" else "right")
    for label, row in per_class.items():
        table.add_row(label, f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}", str(row["support"]))
    stdout.print(table)
