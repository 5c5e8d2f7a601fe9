"""CLI commands that use a trained model: `sft predict`, `sft chat`, `sft serve`, `sft export` (see `register`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from sft_cli.cli.common import NPROC, OVERRIDES, begin, guard, launch


def predict(
    run: Path = typer.Argument(..., metavar="RUN_OR_RECIPE", help="A run directory, or a recipe (its output.dir)."),
    overrides: Optional[List[str]] = OVERRIDES,
    input: str = typer.Option(..., "--input", help="Rows to predict: jsonl/csv/parquet/txt, an image folder, ..."),
    output: Optional[Path] = typer.Option(
        None, "--output", help="JSONL to write (default: RUN/<input>.predictions.jsonl)."
    ),
    model: Optional[Path] = typer.Option(None, "--model", help="Model directory (default: RUN/model)."),
    resume: bool = typer.Option(False, "--resume", help="Continue after the rows already in --output."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --output."),
    nproc: int = NPROC,
) -> None:
    """Predict every input row with a trained model: one JSON line per row, in input order."""
    from sft_cli.commands.predict import default_output
    from sft_cli.commands.predict import predict as run_predict
    from sft_cli.rundir.layout import model_directory, resolve_run

    launch(nproc)
    begin()
    recipe, run_dir = guard(resolve_run, run, list(overrides or []))
    model_dir = guard(model_directory, run_dir, model)
    target = output or default_output(run_dir, input)
    result = guard(run_predict, recipe, model_dir, input, target, resume, overwrite)
    if os.environ.get("RANK", "0") == "0":
        sys.stderr.write(f"{result['written']:,} rows predicted -> {result['output']}\n")


def chat(
    run: Path = typer.Argument(..., metavar="RUN_OR_RECIPE", help="A run directory, or a recipe (its output.dir)."),
    overrides: Optional[List[str]] = OVERRIDES,
    model: Optional[Path] = typer.Option(None, "--model", help="Model directory (default: RUN/model)."),
) -> None:
    """Talk to a trained generation model (history kept). Without a terminal: one stdin line per turn."""
    from sft_cli.commands.chat import chat as run_chat
    from sft_cli.rundir.layout import model_directory, resolve_run

    begin()
    recipe, run_dir = guard(resolve_run, run, list(overrides or []))
    guard(run_chat, recipe, guard(model_directory, run_dir, model))


def serve(
    run: Path = typer.Argument(..., metavar="RUN_OR_RECIPE", help="A run directory, or a recipe (its output.dir)."),
    overrides: Optional[List[str]] = OVERRIDES,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on (0: a free one)."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="SFT_API_KEY", help="Require `Authorization: Bearer KEY` (or set SFT_API_KEY)."
    ),
    model: Optional[Path] = typer.Option(None, "--model", help="Model directory (default: RUN/model)."),
) -> None:
    """Serve a trained model over HTTP: OpenAI-compatible chat/completions, and /v1/predict for every task."""
    from sft_cli.commands.serve import serve as run_serve
    from sft_cli.rundir.layout import model_directory, resolve_run

    begin()
    recipe, run_dir = guard(resolve_run, run, list(overrides or []))
    code = guard(run_serve, recipe, guard(model_directory, run_dir, model), run_dir, host, port, api_key)
    if code:
        raise typer.Exit(code)


def export(
    run: Path = typer.Argument(..., metavar="RUN_DIR", help="A run directory (or its recipe)."),
    to: Path = typer.Option(..., "--to", help="The directory to write."),
    merge_lora: bool = typer.Option(False, "--merge-lora", help="Merge LoRA adapters into the base weights."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16 | fp16 | fp32 (default: as trained)."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model directory (default: RUN/model)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --to directory."),
) -> None:
    """Write a self-contained Hugging Face model directory (weights, config, tokenizer, model card)."""
    from sft_cli.commands.export import export as run_export

    begin()
    result = guard(run_export, run, to, merge_lora, dtype, model, overwrite)
    typer.echo(result["to"])


def register(app: typer.Typer) -> None:
    """Add these commands to the app, in the order `sft --help` lists them."""
    app.command()(predict)
    app.command()(chat)
    app.command()(serve)
    app.command()(export)
