"""Images a person reads: the confusion matrix (and, later, run reports). matplotlib, headless."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sft_cli.rundir.atomic import atomic_directory, read_json_object  # noqa: E402


def confusion_matrix_png(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: Path) -> None:
    """Counts with row-normalized colour, true labels down, predicted across."""
    import numpy as np

    counts = np.asarray(matrix)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", color="white" if rates[i, j] > 0.5 else "black")
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(f"confusion matrix (accuracy {accuracy:.3f}, n={counts.sum()})")
    fig.tight_layout()
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    """Save a figure atomically (render into a temp dir, then rename)."""
    with atomic_directory(path.parent / f".{path.stem}-render") as tmp:
        fig.savefig(tmp / path.name, dpi=110)
    plt.close(fig)
    (path.parent / f".{path.stem}-render" / path.name).replace(path)
    (path.parent / f".{path.stem}-render").rmdir()


METRIC_PREFERENCE = ("eval_fid", "eval_accuracy", "eval_macro_f1", "eval_exact_match", "eval_perplexity")


def report_png(run_dirs: Sequence[Path], path: Path) -> Path:
    """Loss curves, LR schedule, the task metric over time (and the confusion matrix of one run)."""
    from sft_cli.rundir.layout import read_log

    logs = {Path(d): read_log(Path(d) / "metrics.jsonl") for d in run_dirs if (Path(d) / "metrics.jsonl").exists()}
    single = len(logs) == 1
    eval_json = Path(run_dirs[0]) / "eval.json"
    matrix = read_json_object(eval_json) if single else None
    panels = 4 if matrix and "confusion_matrix" in matrix else 3
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    for run, records in logs.items():
        label = run.name
        train = [r for r in records if "loss" in r]
        evals = [r for r in records if "eval_loss" in r]
        line = axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label=f"{label} train")[0]
        if evals:
            axes[0].plot(
                [r["step"] for r in evals],
                [r["eval_loss"] for r in evals],
                "o--",
                color=line.get_color(),
                label=f"{label} eval",
            )
        axes[1].plot([r["step"] for r in train], [r["lr"] for r in train], label=label)
        metric = next((m for m in METRIC_PREFERENCE if any(m in r for r in evals)), None)
        if metric:
            points = [r for r in evals if metric in r]
            axes[2].plot([r["step"] for r in points], [r[metric] for r in points], "o-", label=f"{label} {metric}")
    for ax, title in zip(axes, ("loss", "learning rate", "task metric (eval)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    if panels == 4:
        counts = matrix["confusion_matrix"]
        axes[3].imshow(counts, cmap="Blues")
        labels = matrix.get("labels", [str(i) for i in range(len(counts))])
        axes[3].set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        axes[3].set_yticks(range(len(labels)), labels, fontsize=7)
        axes[3].set_title(f"confusion matrix (acc {matrix['accuracy']:.3f})")
    fig.tight_layout()
    _save(fig, path)
    return path
