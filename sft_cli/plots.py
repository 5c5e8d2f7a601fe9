"""Images a person reads: the confusion matrix (and, later, run reports). matplotlib, headless."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sft_cli.checkpoint import atomic_directory  # noqa: E402


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


def _save(fig: "plt.Figure", path: Path) -> None:
    """Save a figure atomically (render into a temp dir, then rename)."""
    with atomic_directory(path.parent / f".{path.stem}-render") as tmp:
        fig.savefig(tmp / path.name, dpi=110)
    plt.close(fig)
    (path.parent / f".{path.stem}-render" / path.name).replace(path)
    (path.parent / f".{path.stem}-render").rmdir()
