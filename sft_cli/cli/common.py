"""What every `sft` command shares: the app, option definitions, library quieting, logging, --json output,
recipe loading, the launcher, and the one place errors become exit codes."""

from __future__ import annotations

import json
import logging
import os
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
state: dict[str, Any] = {"debug": False, "document": None}  # this invocation: --debug, where --json writes

OVERRIDES = typer.Argument(None, help="key=value overrides, e.g. optim.lr=3e-5 schedule.epochs=1", show_default=False)
RESUME_HELP = "Continue from the newest checkpoint in output.dir (or from PATH)."


def quiet_libraries() -> None:
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


def setup_logging() -> None:
    from rich.logging import RichHandler

    from sft_cli.ui.progress import console

    handler = RichHandler(console=console, show_time=False, show_path=False)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger("sft").setLevel(logging.INFO)


def begin(as_json: bool = False) -> None:
    """What every command does first: quiet the libraries, set up logging, and (--json) claim stdout."""
    quiet_libraries()
    setup_logging()
    json_mode(as_json)


def guard(action, *args, **kwargs):
    """Call a command: a user error is one line and exit 2, a bug one line and exit 1 (tracebacks with --debug)."""
    from sft_cli.engine.checkpointer import Interrupted, Stopped

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


def json_mode(enabled: bool) -> None:
    if enabled:
        from sft_cli.ui.progress import json_mode as redirect_stdout

        state["document"] = redirect_stdout()


def emit(result: Any, enabled: bool) -> None:
    """The command's result as one JSON document on stdout (rank 0 only)."""
    if enabled and os.environ.get("RANK", "0") == "0":
        stream = state["document"] or sys.stdout
        stream.write(json.dumps(result, default=_jsonable) + "\n")
        stream.flush()


def _jsonable(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def load(recipe: Path, overrides: Optional[List[str]]):
    from sft_cli.config.recipe import load_recipe

    return load_recipe(recipe, list(overrides or []))


def resume_value(resume: Optional[str]) -> Optional[str]:
    """`--resume` alone means the newest checkpoint; `--resume PATH` a given one."""
    if resume is None:
        return None
    return "" if resume in ("", "latest", "auto") else resume


NPROC = typer.Option(1, "--nproc", min=1, help="Processes to launch (data parallel, through torchrun).")


def launch(nproc: int) -> None:
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


def fail(message: str) -> None:
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
