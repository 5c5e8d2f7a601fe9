"""Per-token log-probabilities of chosen tokens through a linear output head, never holding more than one chunk of
the `[tokens x vocab]` logits — what preference losses need (a log-probability per completion, with gradients
that differ per sequence, so the sum-only trick of `lm_loss` does not apply).

Forward scores the rows chunk by chunk without keeping logits; backward recomputes each chunk's logits and applies
that token's upstream gradient: d logp_i / d logits_i = onehot(y_i) - softmax_i. Two projections per chunk, as
activation checkpointing would do, but no `[tokens x vocab]` tensor at any time.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from sft_cli.model.lm_loss import chunk_rows


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    logits = hidden.float() @ weight.float().T
    return logits + bias.float() if bias is not None else logits


class _LinearTokenLogps(torch.autograd.Function):
    """logp_i = log softmax(h_i @ W^T + b)[y_i], chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows):  # type: ignore[override]
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        with torch.no_grad():
            for start in range(0, hidden.shape[0], rows):
                logits = _chunk_logits(hidden[start : start + rows], weight, bias)
                y = labels[start : start + rows]
                out[start : start + rows] = logits.gather(1, y[:, None]).squeeze(1) - logits.logsumexp(-1)
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        hidden, weight, bias, labels = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.rows):
            h = hidden[start : start + ctx.rows]
            y, g = labels[start : start + ctx.rows], grad_output[start : start + ctx.rows].float()
            grad = _chunk_logits(h, weight, bias).softmax(-1).mul_(-g[:, None])  # d/d logits = g * (onehot - p)
            grad[torch.arange(len(y), device=grad.device), y] += g
            if grad_hidden is not None:
                grad_hidden[start : start + ctx.rows] = (grad @ weight.float()).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad.T, h.float())
            if grad_bias is not None:
                grad_bias += grad.sum(0)
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
            None,
            None,
        )


def token_logps(
    hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, rows: Optional[int] = None
) -> torch.Tensor:
    """log p(labels[i] | hidden[i]) under `head`, for every row (fp32), chunked."""
    rows = rows or chunk_rows(head.weight.shape[0])
    return _LinearTokenLogps.apply(hidden, head.weight, head.bias, labels, rows)


def sequence_logps(
    hidden: torch.Tensor,
    head: nn.Linear,
    labels: torch.Tensor,
    sequence: torch.Tensor,
    count: int,
    rows: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities and token counts per sequence: rows belong to `sequence[i]` in [0, count)."""
    per_token = token_logps(hidden, head, labels, rows)
    sums = torch.zeros(count, dtype=torch.float32, device=hidden.device).index_add(0, sequence, per_token)
    tokens = torch.zeros(count, dtype=torch.long, device=hidden.device).index_add(
        0, sequence, torch.ones_like(sequence)
    )
    return sums, tokens


def completion_logps(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a causal-LM batch: the summed log-probability of its labelled (completion) tokens, and their
    count. Hidden states go through the output head in chunks (`sequence_logps`), never as full logits."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)[keep]
    if type(head) is nn.Linear:
        return sequence_logps(hidden[keep], head, targets[keep], rows, labels.shape[0])
    per_token = head(hidden[keep]).float().log_softmax(-1).gather(1, targets[keep][:, None]).squeeze(1)  # LoRA head
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device).index_add(0, rows, per_token)
    tokens = torch.zeros(labels.shape[0], dtype=torch.long, device=labels.device).index_add(
        0, rows, torch.ones_like(rows)
    )
    return sums, tokens


def reference_logps(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference model's completion log-probabilities without a second model: a LoRA model's base (its
    adapters disabled), or the model itself as it is now (a pass before training: `loss.reference: precompute`)."""
    with torch.no_grad():
        if hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                return completion_logps(model, input_ids, attention_mask, labels)
        return completion_logps(model, input_ids, attention_mask, labels)
