"""`sft predict`: a trained model over an input file, streamed to JSONL in input order, resumable.

Rows are read in chunks (a 1M-row input never sits in memory); inside a chunk they are sorted by length
and batched, and the chunk is written back in input order and flushed, so a killed run leaves complete
lines only — `--resume` drops a torn last line and continues after the rows already written. With several
processes each takes a contiguous shard into its own part file; rank 0 concatenates them in order.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch

from sft_cli.device import make_accelerator
from sft_cli.errors import SftError
from sft_cli.progress import console
from sft_cli.schema import Recipe
from sft_cli.tasks import build_task

log = logging.getLogger("sft")
CHUNK_BATCHES = 8  # batches per chunk: what is sorted together, and what a kill can lose at most


def default_output(run_dir: Path, input_location: str) -> Path:
    """`<input name>.predictions.jsonl` in the run directory."""
    name = Path(input_location.rstrip("/")).name
    stem = name.split(".")[0] if "." in name else name
    return run_dir / f"{stem}.predictions.jsonl"


def predict(
    recipe: Recipe,
    model_dir: Path,
    input_location: str,
    output: Path,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Predict every row of the input into `output`; returns counts and the output path."""
    if output.exists() and not (resume or overwrite):
        raise SftError(f"--output: {output} exists — pass --resume to continue it or --overwrite to replace it")
    accelerator = make_accelerator(recipe.engine, training=False)
    task = build_task(recipe)
    task.load_for_inference(str(model_dir))
    table = task.prediction_table(input_location)
    task.check_input(table.column_names)
    model = accelerator.prepare_model(task.model, evaluation_mode=True)
    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    per_rank = math.ceil(len(table) / world)
    start, stop = rank * per_rank, min(len(table), (rank + 1) * per_rank)
    part = output if world == 1 else output.with_name(f"{output.name}.part-{rank}")
    done = complete_lines(part) if resume else 0
    if not resume and part.exists():
        part.unlink()
    output.parent.mkdir(parents=True, exist_ok=True)
    written = _run(task, model, table, range(start + done, stop), part, recipe, enabled=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    if world > 1 and accelerator.is_main_process:
        _merge([output.with_name(f"{output.name}.part-{r}") for r in range(world)], output)
    accelerator.wait_for_everyone()
    return {"rows": len(table), "written": written, "resumed_after": done, "output": str(output)}


def _run(task: Any, model: Any, table: Any, rows: range, part: Path, recipe: Recipe, enabled: bool) -> int:
    """Predict `rows` of the table chunk by chunk, appending each finished chunk to `part`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    settings = recipe.predict
    if settings.do_sample:
        torch.manual_seed(recipe.engine.seed if settings.seed is None else settings.seed)
    chunk = settings.batch_size * CHUNK_BATCHES
    progress = Progress(
        TextColumn("[bold]predict"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} rows/s"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled or not console.is_terminal,
    )
    written, started = 0, time.perf_counter()
    with progress, open(part, "a", encoding="utf-8") as out, torch.inference_mode():
        bar = progress.add_task("predict", total=len(rows), rate="-")
        for begin in range(rows.start, rows.stop, chunk):
            end = min(begin + chunk, rows.stop)
            batch_rows = table[begin:end]
            records = [dict(zip(batch_rows, values)) for values in zip(*batch_rows.values())]
            task.check_rows(records, begin + 1)
            results: list[Optional[dict]] = [None] * len(records)
            order = sorted(range(len(records)), key=lambda i: task.predict_length(records[i]))
            for offset in range(0, len(order), settings.batch_size):
                picks = order[offset : offset + settings.batch_size]
                for index, result in zip(picks, task.predict(model, [records[i] for i in picks], settings)):
                    results[index] = result
            out.write(
                "".join(json.dumps({**jsonable(r), **p}, ensure_ascii=False) + "\n" for r, p in zip(records, results))
            )
            out.flush()
            os.fsync(out.fileno())
            written += len(records)
            rate = written / max(time.perf_counter() - started, 1e-9)
            progress.update(bar, advance=len(records), rate=f"{rate:,.1f}")
    return written


def complete_lines(path: Path) -> int:
    """Rows already written: complete lines; a torn last line (a kill mid-write) is cut off."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
    return data[:keep].count(b"\n")


def _merge(parts: list[Path], output: Path) -> None:
    """Concatenate the ranks' contiguous shards in rank order (= input order)."""
    tmp = output.with_name(f".{output.name}.merging")
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                out.write(f.read())
    os.replace(tmp, output)
    for part in parts:
        part.unlink()


def jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """The input row as JSON: images become their path; other odd values their string."""
    out = {}
    for key, value in row.items():
        if isinstance(value, dict) and "path" in value and "bytes" in value:
            value = value["path"]
        elif isinstance(value, bytes):
            continue
        elif not isinstance(value, (str, int, float, bool, list, dict, type(None))):
            value = str(value)
        out[key] = value
    return out
