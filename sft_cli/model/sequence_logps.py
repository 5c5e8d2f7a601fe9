"""Per-token log-probabilities of chosen tokens through a linear output head, never holding more than one chunk of
the `[tokens x vocab]` logits — what preference losses need (a log-probability per completion, with gradients
that differ per sequence, so the sum-only trick of `lm_loss` does not apply).

Forward scores the rows chunk by chunk without keeping logits; backward recomputes each chunk's logits and applies
that token's upstream gradient: d logp_i / d logits_i = onehot(y_i) - softmax_i. Two projections per chunk, as
activation checkpointing would do, but no `[tokens x vocab]` tensor at any time.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from sft_cli.model.lm_loss import WrappedLM, chunk_rows


def _chunk_logits(
    h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], compute: torch.dtype
) -> torch.Tensor:
    """fp32 logits of one chunk, the matmul in `compute` (autocast's dtype, as the model's own head would run)."""
    logits = (h.to(compute) @ weight.T).float()
    return logits + bias.float() if bias is not None else logits


class _LinearTokenLogps(torch.autograd.Function):
    """logp_i = log softmax(h_i @ W^T + b)[y_i], chunk by chunk: matmuls in the compute dtype, softmax in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows):  # type: ignore[override]
        device = hidden.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        with torch.no_grad(), torch.autocast(device, enabled=False):
            w = weight.to(compute)  # once per call, not per chunk
            for start in range(0, hidden.shape[0], rows):
                logits = _chunk_logits(hidden[start : start + rows], w, bias, compute)
                y = labels[start : start + rows]
                out[start : start + rows] = logits.gather(1, y[:, None]).squeeze(1) - logits.logsumexp(-1)
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.rows, ctx.compute = rows, compute
        return out

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        hidden, weight, bias, labels = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        compute = ctx.compute
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=compute, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute)
            for start in range(0, hidden.shape[0], ctx.rows):
                h = hidden[start : start + ctx.rows].to(compute)
                y, g = labels[start : start + ctx.rows], grad_output[start : start + ctx.rows].float()
                grad = _chunk_logits(h, w, bias, compute).softmax(-1).mul_(-g[:, None])  # g * (onehot - p)
                grad[torch.arange(len(y), device=grad.device), y] += g
                low = grad.to(compute)
                if grad_hidden is not None:
                    grad_hidden[start : start + ctx.rows] = (low @ w).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight.addmm_(low.T, h)  # accumulated in the compute dtype, as lm_loss does
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


class SequenceScorer(WrappedLM):
    """A causal LM that returns log p(target) at chosen positions: `forward(input_ids, score_index, score_targets,
    **inputs)` with `score_index` flat indices into [batch x length] (the position that predicts each target).

    Hidden states go through the output head in chunks (no `[tokens x vocab]` tensor) where the architecture's
    logits are exactly head(hidden) (`lm_loss.hidden_loss_matches`); else the full logits of the model, gathered.
    Positions are explicit, so a target need not follow its predictor in the row: the rejected completion of a
    pair packed after its chosen one is scored from the shared prompt's last position.
    """

    def __init__(self, lm: nn.Module, chunked: bool = True):
        super().__init__(lm)
        self.chunked = chunked

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        """engine.grad_checkpointing reaches the language model's layers."""
        self.lm.gradient_checkpointing_enable(**kwargs)

    def forward(
        self, input_ids: torch.Tensor, score_index: torch.Tensor, score_targets: torch.Tensor, **inputs: torch.Tensor
    ) -> torch.Tensor:
        if not self.chunked:
            logits = self.lm(input_ids=input_ids, use_cache=False, **inputs).logits
            rows = logits.reshape(-1, logits.shape[-1])[score_index].float()
            return rows.log_softmax(-1).gather(1, score_targets[:, None]).squeeze(1)
        hidden = self.last_hidden(input_ids, **inputs)
        rows = hidden.reshape(-1, hidden.shape[-1])[score_index]
        head = self.network().get_output_embeddings()
        if type(head) is nn.Linear:
            return token_logps(rows, head, score_targets)
        return head(rows).float().log_softmax(-1).gather(1, score_targets[:, None]).squeeze(1)  # a LoRA head


def per_sequence(values: torch.Tensor, sequence: torch.Tensor, count: int) -> torch.Tensor:
    """Sums of per-token `values` by sequence id in [0, count)."""
    return torch.zeros(count, dtype=values.dtype, device=values.device).index_add(0, sequence, values)
