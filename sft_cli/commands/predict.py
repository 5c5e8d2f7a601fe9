"""`sft predict`: a trained model over an input file, streamed to JSONL in input order, resumable.

Rows are read in chunks (a 1M-row input never sits in memory); inside a chunk they are sorted by length
and batched, and the chunk is written back in input order and flushed, so a killed run leaves complete
lines only — `--resume` drops a torn last line and continues after the rows already written. With several
processes each takes a contiguous shard into its own part file; rank 0 concatenates them in order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from sft_cli.config.schema import Recipe
from sft_cli.data.files import sample_into, split_suffix
from sft_cli.engine.accelerator import make_accelerator
from sft_cli.errors import SftError
from sft_cli.rundir import manifest
from sft_cli.rundir.atomic import check_writable, write_json_atomic
from sft_cli.tasks.registry import build_task
from sft_cli.ui.progress import console

log = logging.getLogger("sft")
CHUNK_BATCHES = 8  # batches per chunk: what is sorted together, and what a kill can lose at most


def default_output(run_dir: Path, input_location: str) -> Path:
    """`<input name>.predictions.jsonl` in the run directory: the whole name, less its data (and compression) suffix."""
    path = Path(str(input_location).rstrip("/"))
    extension, compression = split_suffix(path)
    stem = path.name
    for suffix in (compression, extension):
        if suffix and stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    return run_dir / f"{stem or path.name}.predictions.jsonl"


def predict(
    recipe: Recipe,
    model_dir: Path,
    input_location: str,
    output: Path,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Predict every row of the input into `output`; returns counts and the output path."""
    check_output(output, input_location)
    if output.exists() and not (resume or overwrite):
        raise SftError(f"--output: {output} exists — pass --resume to continue it or --overwrite to replace it")
    written_by = _writer(recipe, model_dir, input_location)
    if resume and output.exists():
        _same_writer(output, written_by)
    accelerator = make_accelerator(recipe.engine, training=False)
    task = build_task(recipe)
    task.load_for_inference(str(model_dir))
    task.prediction_output = output
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
    if accelerator.is_main_process:
        write_json_atomic(meta_path(output), written_by)
        if output.parent.resolve() == Path(recipe.output.dir).resolve():
            manifest.record(output.parent, output, meta_path(output))
    written = _run(task, model, table, range(start + done, stop), part, recipe, enabled=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    if world > 1 and accelerator.is_main_process:
        _merge([output.with_name(f"{output.name}.part-{r}") for r in range(world)], output)
    accelerator.wait_for_everyone()
    return {"rows": len(table), "written": written, "resumed_after": done, "output": str(output)}


def check_output(output: Path, input_location: str) -> None:
    """--output must not be an input file, and its directory must be writable (checked before any compute)."""
    inputs = input_location if isinstance(input_location, (list, tuple)) else [input_location]
    target = output.resolve()
    for location in inputs:
        path = Path(str(location)).expanduser()
        if path.resolve() == target or (path.is_dir() and path.resolve() in target.parents):
            raise SftError(f"--output: {output} is (or is inside) the --input {location} — write somewhere else")
    if output.exists() and output.is_dir():
        raise SftError(f"--output: {output} is a directory — name a .jsonl file")
    check_writable(output.parent, "--output", "choose a writable path")


def meta_path(output: Path) -> Path:
    """Beside the predictions: which model, input and settings wrote them (checked by --resume)."""
    return output.with_name(output.name + ".meta.json")


def _writer(recipe: Recipe, model_dir: Path, input_location: str) -> dict[str, Any]:
    data = recipe.data
    return {
        "model": str(model_dir.resolve()),
        "model_fingerprint": model_fingerprint(model_dir),
        "input": str(Path(str(input_location)).expanduser().resolve()),
        "task": recipe.task,
        "predict": {k: v for k, v in asdict(recipe.predict).items() if k != "batch_size"},
        "data": {
            key: getattr(data, key)
            for key in ("text_field", "prompt_field", "image_field", "template", "format", "messages_field")
            + ("chat_template", "max_length")
        },
    }


def _same_writer(output: Path, expected: dict[str, Any]) -> None:
    """--resume appends to `output` only when the same model, input and settings wrote it."""
    meta = meta_path(output)
    try:
        recorded = json.loads(meta.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SftError(
            f"--resume: {output} has no {meta.name}, so what wrote it is unknown — pass --overwrite to start it "
            "again, or choose another --output"
        ) from None
    except (OSError, ValueError):
        raise SftError(f"--resume: {meta} is unreadable — pass --overwrite to start {output} again") from None
    recorded = recorded if isinstance(recorded, dict) else {}
    for key, what in (("model_fingerprint", "another model"), ("input", "another input"), ("task", "another task")):
        if recorded.get(key) != expected[key]:
            shown = recorded.get("model" if key == "model_fingerprint" else key)
            raise SftError(
                f"--resume: {output} was written from {what} ({shown}) — resuming would mix two sets of "
                "predictions in one file; pass --overwrite, or choose another --output"
            )
    for section in ("predict", "data"):
        theirs = recorded.get(section) or {}
        for key, value in expected[section].items():
            if theirs.get(key) != value:
                raise SftError(
                    f"--resume: {output} was written with {section}.{key}={theirs.get(key)!r}, this run has "
                    f"{value!r} — resume with the same settings, or pass --overwrite"
                )


def model_fingerprint(model_dir: Path) -> str:
    """A cheap content hash of a model directory: its config and, per weights file, its size and first/last MiB."""
    digest = hashlib.sha256()
    for path in sorted(model_dir.iterdir()):
        if path.name == "config.json" or path.name == "adapter_config.json":
            digest.update(path.read_bytes())
        elif path.suffix in (".safetensors", ".bin", ".pt"):
            digest.update(f"{path.name}|{path.stat().st_size}|".encode())
            sample_into(digest, path)
    return digest.hexdigest()[:16]


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
            lines = predict_records(task, model, records, begin + 1, settings)
            out.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
            out.flush()
            os.fsync(out.fileno())
            written += len(records)
            rate = written / max(time.perf_counter() - started, 1e-9)
            progress.update(bar, advance=len(records), rate=f"{rate:,.1f}")
    return written


def predict_records(task: Any, model: Any, records: list[dict], first: int, settings: Any) -> list[dict[str, Any]]:
    """What `sft predict` writes for these input rows (`first` numbers the first, from 1), in their order: each row's
    own fields plus its prediction, or why it was skipped. Rows are batched by length, `settings.batch_size` each."""
    problems = task.row_problems(records, first)
    results: list[Optional[dict]] = [
        None if problem is None else {"prediction": None, "skipped": problem} for problem in problems
    ]
    usable = [i for i, problem in enumerate(problems) if problem is None]
    order = sorted(usable, key=lambda i: task.predict_length(records[i]))
    for offset in range(0, len(order), settings.batch_size):
        picks = order[offset : offset + settings.batch_size]
        for index, result in zip(picks, task.predict(model, [records[i] for i in picks], settings)):
            results[index] = result
    return [{**jsonable(r), **p} for r, p in zip(records, results)]


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
