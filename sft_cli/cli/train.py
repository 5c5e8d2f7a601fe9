"""`sft finetune`, `pretrain`, `eval`, `plan`, `sweep`, `report`, `init`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

from sft_cli.cli.common import (
    JSON,
    NPROC,
    OVERRIDES,
    RESUME_HELP,
    begin,
    emit,
    fail,
    guard,
    launch,
    load,
    resume_value,
)


def _train(
    command: str, recipe: Path, overrides: Optional[List[str]], resume: Optional[str], overwrite: bool, as_json: bool
) -> None:
    from sft_cli.commands import train as commands

    begin(as_json)
    parsed = guard(load, recipe, overrides)
    again = ["sft", command, str(recipe), *(overrides or []), "--resume"]
    resume_command = " ".join(shlex.quote(a) for a in again)
    try:
        emit(guard(commands.train, parsed, command, resume_value(resume), overwrite, resume_command), as_json)
    except typer.Exit as stop:
        if stop.exit_code in (130, 143):
            sys.stderr.write(f"resume with: {resume_command}\n")
        raise


def finetune(
    recipe: Path = typer.Argument(..., help="The recipe YAML."),
    overrides: Optional[List[str]] = OVERRIDES,
    resume: Optional[str] = typer.Option(None, "--resume", help=RESUME_HELP, metavar="[PATH]"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished run in output.dir."),
    nproc: int = NPROC,
    as_json: bool = JSON,
) -> None:
    """Supervised fine-tuning: text and image classification, regression, multi-label, NER, QA, generation, chat."""
    launch(nproc)
    _train("finetune", recipe, overrides, resume, overwrite, as_json)


def pretrain(
    recipe: Path = typer.Argument(..., help="The recipe YAML."),
    overrides: Optional[List[str]] = OVERRIDES,
    resume: Optional[str] = typer.Option(None, "--resume", help=RESUME_HELP, metavar="[PATH]"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished run in output.dir."),
    nproc: int = NPROC,
    as_json: bool = JSON,
) -> None:
    """Unsupervised language modelling (next-token or masked) on raw text, from scratch or continued."""
    launch(nproc)
    _train("pretrain", recipe, overrides, resume, overwrite, as_json)


def eval_command(
    recipe: Path = typer.Argument(..., help="The recipe YAML."),
    overrides: Optional[List[str]] = OVERRIDES,
    model: Optional[Path] = typer.Option(None, "--model", help="Model directory (default: output.dir/model)."),
    nproc: int = NPROC,
    as_json: bool = JSON,
) -> None:
    """Evaluate a trained model on data.eval; writes eval.json into output.dir."""
    from sft_cli.commands import train as commands

    launch(nproc)
    begin(as_json)
    parsed = guard(load, recipe, overrides)
    emit(guard(commands.evaluate_model, parsed, str(model) if model else None), as_json)


def plan_command(
    recipe: Path = typer.Argument(..., help="The recipe YAML."),
    overrides: Optional[List[str]] = OVERRIDES,
    as_json: bool = JSON,
) -> None:
    """Show what a run would do before any compute: recipe, parameters, data, examples, cost."""
    from sft_cli.commands.plan import plan

    begin(as_json)
    parsed = guard(load, recipe, overrides)
    emit(guard(plan, parsed), as_json)


def sweep_command(
    recipe: Path = typer.Argument(..., help="The recipe YAML, with a `sweep:` search space."),
    overrides: Optional[List[str]] = OVERRIDES,
    trials: int = typer.Option(10, "--trials", min=1, help="Total trials (an interrupted sweep resumes)."),
    sampler: str = typer.Option("tpe", "--sampler", help="tpe | random | grid"),
    metric: Optional[str] = typer.Option(
        None, "--metric", help="Eval metric to optimize (default: early_stopping.metric or eval_loss)."
    ),
    direction: Optional[str] = typer.Option(None, "--direction", help="minimize | maximize"),
) -> None:
    """Hyperparameter search (Optuna): each trial a normal run in output.dir/trial-NNN."""
    from sft_cli.commands.sweep import sweep

    begin()
    parsed = guard(load, recipe, overrides)
    guard(sweep, parsed, lambda extra: load(recipe, list(overrides or []) + extra), trials, sampler, metric, direction)


def report(
    run_dirs: List[Path] = typer.Argument(..., help="One or more run directories (output.dir of a run)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="PNG to write (default: RUN_DIR/report.png)."),
) -> None:
    """Redraw a run's report.png (loss, LR, task metric, confusion matrix); several runs are overlaid."""
    from sft_cli.ui.plots import report_png

    missing = [str(d) for d in run_dirs if not (d / "metrics.jsonl").exists()]
    if missing:
        guard(fail, f"RUN_DIR: no metrics.jsonl in {', '.join(missing)} — pass the output.dir of a run")
    target = output or (run_dirs[0] / "report.png" if len(run_dirs) == 1 else Path("report.png"))
    report_png(run_dirs, target)
    typer.echo(str(target))


def init(
    task: str = typer.Argument(..., help="classification | image-classification | generation | language-modeling"),
    output: Path = typer.Option(
        None, "--output", "-o", help="Where to write the recipe (default: recipes/<task>.yaml)."
    ),
) -> None:
    """Write a commented starter recipe for a task."""
    from sft_cli.commands.starter import starter_recipe

    target = output or Path("recipes") / f"{task}.yaml"
    if target.exists():
        guard(fail, f"--output: {target} exists — choose another path")
    text = guard(starter_recipe, task, str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    typer.echo(str(target))


def register(app: typer.Typer) -> None:
    """Add these commands to the app, in the order `sft --help` lists them."""
    app.command()(finetune)
    app.command()(pretrain)
    app.command("eval")(eval_command)
    app.command("plan")(plan_command)
    app.command("sweep")(sweep_command)
    app.command()(report)
    app.command()(init)
