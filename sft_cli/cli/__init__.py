"""The `sft` command line: load the recipe, apply key=value overrides, call the command. Thin.

`common` holds what every command shares; `train`, `batch` and `use` each register their commands on the app.
"""

from __future__ import annotations

import sys

import typer

from sft_cli.cli import batch, train, use
from sft_cli.cli.common import app, optional_resume_value, state


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors.")) -> None:
    """sft: pretrain, fine-tune and evaluate transformer models from YAML recipes."""
    state["debug"] = debug


for module in (train, batch, use):  # the order of `sft --help`
    module.register(app)


def run() -> None:
    """Console-script entry point."""
    app(args=optional_resume_value(sys.argv[1:]), prog_name="sft")


__all__ = ["app", "optional_resume_value", "run", "state"]
