"""`sft plan`: everything a run would do, before any compute — recipe, model size, data, examples, cost."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from sft_cli.config.recipe import Recipe, to_yaml
from sft_cli.engine.accelerator import autocast_dtype, estimate_flops_per_token, measure_peak_flops, resolve_precision
from sft_cli.model.backbone import count_parameters
from sft_cli.tasks.registry import build_task
from sft_cli.ui.progress import human, stdout

ASSUMED_MFU = 0.25  # what sft reaches on CPU for MiniLM-sized models (benchmarks/RESULTS.md)


def plan(recipe: Recipe) -> dict[str, Any]:
    """Build the task (no training), print the plan, and return its numbers."""
    import torch

    task = build_task(recipe)
    task.computes = False  # tokenize and count, never run the model over the data
    task.setup(train=True)
    if task.streaming:
        return _stream_plan(recipe, task)
    params = count_parameters(task.model)
    lengths = task.lengths("train")
    num_rows = task.mixture.epoch_size if task.mixture is not None else len(task.train_set)
    packed = hasattr(task.train_set, "rows")
    example_lengths = [len(e) for r in task.train_set.rows for e in r["input_ids"]] if packed else lengths
    steps = math.ceil(math.ceil(num_rows / recipe.schedule.batch_size) / recipe.schedule.grad_accum)
    on_gpu = recipe.engine.device in ("auto", "cuda") and torch.cuda.is_available()
    precision = resolve_precision(recipe.engine.precision, on_gpu)
    dtype = autocast_dtype(precision)
    epoch_rows = task.mixture.epoch_indices(0) if task.mixture is not None else None
    if lengths is None:
        tokens = num_rows
    else:
        tokens = int(sum(lengths) if epoch_rows is None else np.asarray(lengths)[epoch_rows].sum())
    seconds = (
        tokens
        * estimate_flops_per_token(task.model)
        / (measure_peak_flops(torch.device("cuda" if on_gpu else "cpu"), dtype) * ASSUMED_MFU)
    )
    trainable_bytes = params["trainable_params"] * (4 + 4 + 8)  # weights, grads, Adam moments
    memory_mb = (params["total_params"] * 4 + trainable_bytes) / 2**20
    info = {
        **params,
        "train_examples": len(example_lengths) if example_lengths is not None else num_rows,
        **({"packed_rows": num_rows} if packed else {}),
        "eval_examples": len(task.eval_set) if task.eval_set is not None else 0,
        "steps_per_epoch": steps,
        "total_steps": min(recipe.schedule.max_steps or 10**12, math.ceil(steps * recipe.schedule.epochs)),
        "precision": precision,
        "skipped_rows": task.skipped.total(),
        "est_seconds_per_epoch": round(seconds, 1),
        "est_memory_mb": round(memory_mb, 1),
    }
    if example_lengths is not None:
        arr = np.asarray(example_lengths)
        info.update({f"length_p{p}": int(np.percentile(arr, p)) for p in (50, 90, 99)})
        info["length_max"] = int(arr.max())
        if task.truncates:
            info["truncated_examples"] = int((arr >= recipe.data.max_length).sum())
    stdout.rule("recipe (resolved)")
    stdout.print(to_yaml(recipe), highlight=False, markup=False)
    table = Table(
        title=f"plan: {recipe.name} ({recipe.task}, backbone {recipe.backbone.arch or recipe.backbone.name})",
        show_header=False,
    )
    for key, value in info.items():
        table.add_row(key, human(value))
    stdout.print(table)
    for key in task.skipped.by_split:
        stdout.print(f"skipped in {key}: {task.skipped.describe(key)}", highlight=False)
    info["skipped_rows_by_split"] = task.skipped.by_split
    for key, value in task.plan_statistics().items():
        info[key] = value
        shown = ", ".join(f"{k} {human(v)}" for k, v in value.items()) if isinstance(value, dict) else human(value)
        title = "labels" if key == "label_distribution" else key.replace("_", " ")
        stdout.print(f"{title}: {shown}", highlight=False)
    if task.mixture is not None:
        info["mixture"] = mixture_plan(task.mixture, lengths)
        print_mixture(info["mixture"])
    extras = task.summary_extras()
    if extras.get("packing_efficiency") is not None:
        info["packing_efficiency"] = extras["packing_efficiency"]
        stdout.print(f"packing efficiency: {extras['packing_efficiency']:.1%} of slot tokens are real", highlight=False)
    if extras.get("trained_tokens_per_role"):
        info["trained_tokens_per_role"] = extras["trained_tokens_per_role"]
        print_role_shares(extras["trained_tokens_per_role"])
    if extras.get("chat_history"):
        info["chat_history"] = history = extras["chat_history"]
        counts = ", ".join(f"{n:,} {mode}" for mode, n in history["examples"].items())
        because = f" — per-turn because {history['per_turn_because']}" if history.get("per_turn_because") else ""
        stdout.print(f"chat history (data.history): {counts} example(s){because}", highlight=False)
        stdout.print(f"end of turn: {history['end_of_turn']}", highlight=False)
    if task.mixture is not None:  # the first example of each source
        stdout.rule("the first example of each source as the model sees it")
        shown = [int(start) for start, end in zip(task.mixture.offsets, task.mixture.offsets[1:]) if end > start]
    else:
        stdout.rule("two examples as the model sees them")
        shown = list(range(min(2, num_rows)))
    for index in shown:
        stdout.print(render_example(task, task.train_set[index]), highlight=False)
    return info


def render_example(task: Any, row: dict) -> str:
    """Decoded tokens; for generation the untrained (masked) and trained spans are marked apart."""
    from rich.markup import escape

    shown = task.render(row)
    if shown is not None:
        return escape(shown)
    tokenizer = getattr(task, "tokenizer", None)
    if tokenizer is None or "input_ids" not in row:
        return f"label={row.get(task.recipe.data.label_field)!r} (image)"
    ids, trained = row["input_ids"], row.get("trained")
    if isinstance(ids[0], list):  # a packed row: show its first example
        ids, trained = ids[0], trained[0]
    if trained is None:
        return escape(tokenizer.decode(ids)) + escape(task.describe_target(row))
    weight = task.recipe.loss.prompt
    untrained = "no loss" if weight == 0 else f"weight {weight}"
    parts, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or trained[end] != trained[start]:
            text = escape(tokenizer.decode(ids[start:end]))
            if trained[start]:
                parts.append(f"[bold green]\\[trained][/bold green][bold]{text}[/bold]")
            else:
                parts.append(f"[dim]\\[{untrained}]{text}[/dim]")
            start = end
    return "".join(parts)


def mixture_plan(mixture: Any, lengths: Any) -> list[dict[str, Any]]:
    """Per source of a data.train mixture: its rows and tokens, what one epoch draws, and the effective shares."""
    rows = mixture.describe()
    if mixture.streaming or lengths is None:
        return rows
    lengths = np.asarray(lengths)
    drawn = mixture.epoch_indices(0)
    sources = mixture.source_of(drawn)
    per_epoch = [int(lengths[drawn[sources == i]].sum()) for i in range(len(rows))]
    for i, row in enumerate(rows):
        start, end = mixture.offsets[i], mixture.offsets[i + 1]
        row["tokens"] = int(lengths[start:end].sum())
        row["tokens_per_epoch"] = per_epoch[i]
        row["token_share"] = round(per_epoch[i] / max(sum(per_epoch), 1), 4)
    return rows


def print_mixture(rows: list[dict[str, Any]]) -> None:
    """The mixture's sources as a table."""
    columns = [
        c
        for c in (
            "source",
            "path",
            "files",
            "rows",
            "rows_per_epoch",
            "share",
            "tokens",
            "tokens_per_epoch",
            "token_share",
        )
        if c in rows[0]
    ]
    table = Table(title="data.train mixture (one epoch)")
    for column in columns:
        table.add_column(column, justify="left" if column in ("source", "path") else "right")
    for row in rows:
        table.add_row(
            *(
                f"{row[c]:.1%}" if "share" in c else human(row[c]) if isinstance(row[c], int) else str(row[c])
                for c in columns
            )
        )
    stdout.print(table)


def _cell(column: str, value: Any) -> str:
    if "share" in column:
        return f"{value:.1%}"
    if column == "path":
        return Path(value).name or value
    return human(value) if isinstance(value, int) else str(value)


def print_role_shares(shares: dict[str, dict[str, Any]]) -> None:
    """Tokens per role and the share of them that trains."""
    table = Table(title="tokens trained per role (training split)")
    for column in ("role", "tokens", "trained", "share"):
        table.add_column(column, justify="left" if column == "role" else "right")
    for role, row in shares.items():
        table.add_row(role, f"{row['tokens']:,}", f"{row['trained']:,}", f"{row['share']:.1%}")
    stdout.print(table)


def _stream_plan(recipe: Recipe, task: Any) -> dict[str, Any]:
    """data.streaming: the corpus is not read ahead, so the plan has the files and the budget, not counts."""
    schedule = recipe.schedule
    builder = task.stream_sources[0][1][0]  # the first source's format
    files = [f for _, (_, source_files), _ in task.stream_sources for f in source_files]
    per_step = recipe.data.max_length * schedule.batch_size * schedule.grad_accum
    steps = [n for n in (schedule.max_steps, math.ceil((schedule.max_tokens or 0) / per_step)) if n]
    info = {
        **count_parameters(task.model),
        "streaming": True,
        "train_files": len(files),
        "train_format": builder,
        "train_bytes": sum(p.stat().st_size for p in files),
        "eval_examples": len(task.eval_set) if task.eval_set is not None else 0,
        "total_steps": min(steps),
        "tokens_per_step": per_step,
        "skipped_rows": task.skipped.total(),
    }
    stdout.rule("recipe (resolved)")
    stdout.print(to_yaml(recipe), highlight=False, markup=False)
    table = Table(title=f"plan: {recipe.name} (streaming {recipe.task})", show_header=False)
    for key, value in info.items():
        table.add_row(key, human(value))
    stdout.print(table)
    if task.mixture is not None:
        info["mixture"] = mixture_plan(task.mixture, None)
        for row, (_, (_, source_files), _) in zip(info["mixture"], task.stream_sources):
            row["files"] = len(source_files)
        print_mixture(info["mixture"])
    return info
