"""The `sft` command line: load the recipe, apply key=value overrides, call the command. Thin."""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer

from sft_cli.errors import SftError, is_storage_error, storage_message

app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    help="Turn a YAML recipe into a trained, evaluated model.",
    pretty_exceptions_enable=False,
)
state = {"debug": False}

OVERRIDES = typer.Argument(None, help="key=value overrides, e.g. optim.lr=3e-5 schedule.epochs=1", show_default=False)
RESUME_HELP = "Continue from the newest checkpoint in output.dir (or from PATH)."


def _quiet_libraries() -> None:
    """Keep library chatter (load reports, per-file progress bars) off the user's terminal."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed picks here anyway, without its stdout warning
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its load errors become our one-line errors


def _setup_logging() -> None:
    from rich.logging import RichHandler

    from sft_cli.progress import console

    handler = RichHandler(console=console, show_time=False, show_path=False)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger("sft").setLevel(logging.INFO)


def _run(action, *args, **kwargs):
    """Call a command: a user error is one line and exit 2, a bug one line and exit 1 (tracebacks with --debug)."""
    from sft_cli.checkpointing import Interrupted, Stopped

    try:
        return action(*args, **kwargs)
    except SftError as err:
        if state["debug"]:
            raise
        sys.stderr.write("error: " + " ".join(str(err).split()) + "\n")
        raise typer.Exit(err.exit_code) from None
    except Interrupted as stop:
        sys.stderr.write(f"interrupted: checkpoint saved at {stop.checkpoint}\n")
        raise typer.Exit(stop.code) from None
    except Stopped as stop:
        sys.stderr.write(f"interrupted: {stop} before the first checkpoint\n")
        raise typer.Exit(stop.code) from None
    except (typer.Exit, KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:
        if state["debug"]:
            raise
        if is_storage_error(err):  # the disk or permissions, not sft
            sys.stderr.write("error: " + " ".join(storage_message(err).split()) + "\n")
            raise typer.Exit(2) from None
        detail = " ".join(str(err).split())[:300]
        sys.stderr.write(
            f"internal error: {type(err).__name__}: {detail} — this is a bug in sft; please report it with the "
            "output of the same command run as `sft --debug ...`\n"
        )
        raise typer.Exit(1) from None


JSON = typer.Option(False, "--json", help="Human output to stderr; stdout gets exactly one JSON document.")


_DOCUMENT: dict[str, Any] = {"stream": None}  # where --json writes its one document


def _json_mode(enabled: bool) -> None:
    if enabled:
        from sft_cli.progress import json_mode

        _DOCUMENT["stream"] = json_mode()


def _emit(result: Any, enabled: bool) -> None:
    """The command's result as one JSON document on stdout (rank 0 only)."""
    if enabled and os.environ.get("RANK", "0") == "0":
        stream = _DOCUMENT["stream"] or sys.stdout
        stream.write(json.dumps(result, default=_jsonable) + "\n")
        stream.flush()


def _jsonable(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _load(recipe: Path, overrides: Optional[List[str]]):
    from sft_cli.recipe import load_recipe

    return load_recipe(recipe, list(overrides or []))


def _resume_value(resume: Optional[str]) -> Optional[str]:
    """`--resume` alone means the newest checkpoint; `--resume PATH` a given one."""
    if resume is None:
        return None
    return "" if resume in ("", "latest", "auto") else resume


NPROC = typer.Option(1, "--nproc", min=1, help="Processes to launch (data parallel, through torchrun).")


def _launch(nproc: int) -> None:
    """Re-run this command under torchrun with N processes (unless already inside a launcher)."""
    if nproc <= 1 or "WORLD_SIZE" in os.environ:
        return
    import subprocess

    args, skip = [], False
    for arg in optional_resume_value(sys.argv[1:]):
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        args.append(arg)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "sft_cli",
        *args,
    ]
    raise typer.Exit(subprocess.call(command))


def _train(
    command: str, recipe: Path, overrides: Optional[List[str]], resume: Optional[str], overwrite: bool, as_json: bool
) -> None:
    from sft_cli import commands

    _quiet_libraries()
    _setup_logging()
    _json_mode(as_json)
    parsed = _run(_load, recipe, overrides)
    again = ["sft", command, str(recipe), *(overrides or []), "--resume"]
    resume_command = " ".join(shlex.quote(a) for a in again)
    try:
        _emit(_run(commands.train, parsed, command, _resume_value(resume), overwrite, resume_command), as_json)
    except typer.Exit as stop:
        if stop.exit_code in (130, 143):
            sys.stderr.write(f"resume with: {resume_command}\n")
        raise


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors.")) -> None:
    """sft: pretrain, fine-tune and evaluate transformer models from YAML recipes."""
    state["debug"] = debug


@app.command()
def finetune(
    recipe: Path = typer.Argument(..., help="The recipe YAML."),
    overrides: Optional[List[str]] = OVERRIDES,
    resume: Optional[str] = typer.Option(None, "--resume", help=RESUME_HELP, metavar="[PATH]"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished run in output.dir."),
    nproc: int = NPROC,
    as_json: bool = JSON,
) -> None:
    """Supervised fine-tuning (classification, image classification, prompt->response generation)."""
    _launch(nproc)
    _train("finetune", recipe, overrides, resume, overwrite, as_json)


@app.command()
def pretrain(
    recipe: Path = typer.Argument(..., help="The recipe YAML."),
    overrides: Optional[List[str]] = OVERRIDES,
    resume: Optional[str] = typer.Option(None, "--resume", help=RESUME_HELP, metavar="[PATH]"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished run in output.dir."),
    nproc: int = NPROC,
    as_json: bool = JSON,
) -> None:
    """Unsupervised language modelling (next-token or masked) on raw text, from scratch or continued."""
    _launch(nproc)
    _train("pretrain", recipe, overrides, resume, overwrite, as_json)


@app.command("eval")
def evaluate(
    recipe: Path = typer.Argument(..., help="The recipe YAML."),
    overrides: Optional[List[str]] = OVERRIDES,
    model: Optional[Path] = typer.Option(None, "--model", help="Model directory (default: output.dir/model)."),
    nproc: int = NPROC,
    as_json: bool = JSON,
) -> None:
    """Evaluate a trained model on data.eval; writes eval.json into output.dir."""
    from sft_cli import commands

    _launch(nproc)
    _quiet_libraries()
    _setup_logging()
    _json_mode(as_json)
    parsed = _run(_load, recipe, overrides)
    _emit(_run(commands.evaluate_model, parsed, str(model) if model else None), as_json)


@app.command("plan")
def plan_command(
    recipe: Path = typer.Argument(..., help="The recipe YAML."),
    overrides: Optional[List[str]] = OVERRIDES,
    as_json: bool = JSON,
) -> None:
    """Show what a run would do before any compute: recipe, parameters, data, examples, cost."""
    from sft_cli.plan import plan

    _quiet_libraries()
    _setup_logging()
    _json_mode(as_json)
    parsed = _run(_load, recipe, overrides)
    _emit(_run(plan, parsed), as_json)


@app.command("sweep")
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
    from sft_cli.sweep import sweep

    _quiet_libraries()
    _setup_logging()
    parsed = _run(_load, recipe, overrides)
    _run(sweep, parsed, lambda extra: _load(recipe, list(overrides or []) + extra), trials, sampler, metric, direction)


@app.command()
def report(
    run_dirs: List[Path] = typer.Argument(..., help="One or more run directories (output.dir of a run)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="PNG to write (default: RUN_DIR/report.png)."),
) -> None:
    """Redraw a run's report.png (loss, LR, task metric, confusion matrix); several runs are overlaid."""
    from sft_cli.plots import report_png

    missing = [str(d) for d in run_dirs if not (d / "metrics.jsonl").exists()]
    if missing:
        _run(_fail, f"RUN_DIR: no metrics.jsonl in {', '.join(missing)} — pass the output.dir of a run")
    target = output or (run_dirs[0] / "report.png" if len(run_dirs) == 1 else Path("report.png"))
    report_png(run_dirs, target)
    typer.echo(str(target))


@app.command()
def init(
    task: str = typer.Argument(..., help="classification | image-classification | generation | language-modeling"),
    output: Path = typer.Option(
        None, "--output", "-o", help="Where to write the recipe (default: recipes/<task>.yaml)."
    ),
) -> None:
    """Write a commented starter recipe for a task."""
    from sft_cli.starter import starter_recipe

    target = output or Path("recipes") / f"{task}.yaml"
    if target.exists():
        _run(_fail, f"--output: {target} exists — choose another path")
    text = _run(starter_recipe, task, str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    typer.echo(str(target))


def _fail(message: str) -> None:
    raise SftError(message)


def optional_resume_value(args: list[str]) -> list[str]:
    """Let `--resume` stand alone (newest checkpoint) or take a PATH, as click options cannot.

    Only `finetune` and `pretrain` take a PATH; elsewhere (`predict --resume`) it is a plain flag.
    """
    command = next((a for a in args if not a.startswith("-")), "")
    if command not in ("finetune", "pretrain"):
        return list(args)
    out = []
    for index, arg in enumerate(args):
        if arg != "--resume":
            out.append(arg)
            continue
        following = args[index + 1] if index + 1 < len(args) else None
        is_path = following is not None and not following.startswith("-") and "=" not in following
        is_path = is_path and not following.endswith((".yaml", ".yml"))
        out.append("--resume" if is_path else "--resume=latest")
    return out


from sft_cli import cli_batch, cli_use  # noqa: E402, F401 - they register their commands on `app`


def run() -> None:
    """Console-script entry point."""
    app(args=optional_resume_value(sys.argv[1:]), prog_name="sft")
