"""CLI commands for CI and batch use: `sft prepare`, `sft check`, `sft runs` (see `register`)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer

from sft_cli.cli.common import JSON, OVERRIDES, begin, emit, guard, load


def prepare_command(
    recipe: Path = typer.Argument(..., help="The recipe YAML."),
    overrides: Optional[List[str]] = OVERRIDES,
    as_json: bool = JSON,
) -> None:
    """Parse and tokenize (pretraining: pack) the recipe's data once into data.cache_dir, for every later run."""
    from sft_cli.commands.prepare import prepare
    from sft_cli.ui.progress import print_table

    begin(as_json)
    parsed = guard(load, recipe, overrides)
    result = guard(prepare, parsed)
    if not as_json:
        print_table(f"{parsed.name}: prepared data", result)
    emit(result, as_json)


def check_command(
    recipes: List[Path] = typer.Argument(..., help="Recipe files (a shell glob such as recipes/**/*.yaml works)."),
    overrides: Optional[List[str]] = typer.Option(
        None, "--set", help="key=value applied to every recipe (repeatable)."
    ),
    steps: int = typer.Option(2, "--steps", min=1, help="Optimizer steps per recipe."),
    device: str = typer.Option("cpu", "--device", help="cpu (default) | auto (the recipe's engine.device)."),
    as_json: bool = JSON,
) -> None:
    """Smoke-test recipes in seconds: validate, read the data, build the model, a few steps and a tiny eval."""
    from sft_cli.commands.check import check
    from sft_cli.ui.progress import quiet

    begin(as_json)
    overrides = list(overrides or []) + [r for r in map(str, recipes) if "=" in r and not r.endswith((".yaml", ".yml"))]
    paths = [r for r in recipes if not ("=" in str(r) and not str(r).endswith((".yaml", ".yml")))]
    logging.getLogger("sft").setLevel(logging.WARNING)
    with quiet():
        rows = guard(check, paths, overrides, steps, device)
    _print_check(rows)
    emit(rows, as_json)
    if any(r["status"] == "fail" for r in rows):
        raise typer.Exit(2)


def _print_check(rows: list) -> None:
    """A table on a terminal; one plain line per recipe elsewhere (CI logs, pipes)."""
    from rich.table import Table

    from sft_cli.ui.progress import stdout

    if not stdout.is_terminal:
        for row in rows:
            error = f"  {row['error']}" if row["error"] else ""
            line = (
                f"{row['status'].upper():7} {row['recipe']}  {row['name']}  {row['task']}  {row['seconds']:.1f}s{error}"
            )
            stdout.print(line, highlight=False, markup=False, soft_wrap=True)
        return
    table = Table(title="sft check")
    for column in ("recipe", "name", "task", "status", "seconds", "error"):
        table.add_column(column, overflow="fold")
    for row in rows:
        style = {"pass": "green", "fail": "bold red", "skipped": "yellow"}[row["status"]]
        table.add_row(
            row["recipe"],
            row["name"],
            str(row["task"]),
            f"[{style}]{row['status']}[/]",
            f"{row['seconds']:.1f}",
            row["error"] or "",
        )
    stdout.print(table)


def runs_command(
    dirs: Optional[List[Path]] = typer.Argument(None, help="Run directories or folders of them (default: runs/)."),
    sort: str = typer.Option(
        "dir", "--sort", help="Column to sort by: dir name task status step train_s metric value tokens_per_s."
    ),
    desc: bool = typer.Option(False, "--desc", help="Sort descending."),
    fmt: str = typer.Option("table", "--format", help="table | md | csv | json"),
) -> None:
    """One row per run directory: status, steps, train time, the task's main metric, tokens/s."""
    from sft_cli.commands.runs import COLUMNS, render, table_rows

    rows = guard(table_rows, list(dirs or [Path("runs")]), sort, desc)
    if fmt != "table":
        sys.stdout.write(guard(render, rows, fmt))
        return
    from rich.table import Table

    from sft_cli.ui.progress import human, stdout

    table = Table(title=f"{len(rows)} run(s)")
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in ("step", "train_s", "value", "tokens_per_s") else "left")
    for row in rows:
        table.add_row(*[str(row[c]) if c in ("dir", "name") else human(row[c]) for c in COLUMNS])
    stdout.print(table)


def register(app: typer.Typer) -> None:
    """Add these commands to the app, in the order `sft --help` lists them."""
    app.command("prepare")(prepare_command)
    app.command("check")(check_command)
    app.command("runs")(runs_command)
