"""Loss functions and the loss mix L = w_sup * L_sup + lambda * L_lm. Pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def summed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy summed over items whose label is not -100 (optionally weighted per item, label-smoothed)."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    per_item = F.cross_entropy(
        flat_logits, flat_labels, ignore_index=-100, reduction="none", label_smoothing=label_smoothing
    )
    if weights is not None:
        per_item = per_item * weights.reshape(-1)
    return per_item.sum()


def regression_loss(outputs: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-example loss (mse | huber | l1, averaged over the targets), summed over the examples."""
    outputs, targets = outputs.reshape(targets.shape).float(), targets.float()
    if kind == "mse":
        per_value = F.mse_loss(outputs, targets, reduction="none")
    elif kind == "huber":
        per_value = F.huber_loss(outputs, targets, reduction="none", delta=1.0)
    else:
        per_value = F.l1_loss(outputs, targets, reduction="none")
    return per_value.reshape(targets.shape[0], -1).mean(-1).sum()


def summed_binary_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Multi-label BCE with logits (optionally `pos_weight` per label): each example's mean over labels, summed."""
    per_value = F.binary_cross_entropy_with_logits(
        logits.float(), targets.float(), pos_weight=pos_weight, reduction="none"
    )
    return per_value.mean(-1).sum()


def shift_for_next_token(labels: torch.Tensor) -> torch.Tensor:
    """Labels for next-token prediction: position t predicts token t+1 (last position ignored)."""
    shifted = labels.new_full(labels.shape, -100)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def mix(
    terms: dict[str, tuple[torch.Tensor, torch.Tensor]],
    window_counts: dict[str, torch.Tensor],
    weights: dict[str, float],
    scale: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Normalize each summed term by its item count over the accumulation window, then weight and add.

    `scale` multiplies the result (the world size under DDP, whose gradient averaging divides again).
    Returns the total and the per-term normalized values (for logging).
    """
    total = None
    parts: dict[str, torch.Tensor] = {}
    for name, (summed, _count) in terms.items():
        value = summed / window_counts[name].clamp(min=1).to(summed.device)
        parts[name] = value.detach()
        weighted = weights.get(name, 1.0) * value
        total = weighted if total is None else total + weighted
    assert total is not None, "a task returned no loss terms"
    return total * scale, parts
