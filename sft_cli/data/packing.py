"""Packing several examples into one row, without letting them see each other.

Rows carry per-example `position_ids` (restarting at 0) and segment ids; the model either isolates the
examples from the position_ids alone (transformers builds a block-diagonal mask, or varlen kernels with
flash-attention) or receives our dense block-diagonal mask. Which one works is checked, not assumed.
"""

from __future__ import annotations

import bisect
from typing import Any, Optional, Sequence

import torch

PAD_MULTIPLE = 8  # tensor-core / vector friendly shapes at almost no padding cost


def pad_multiple(length: int, multiple: int = PAD_MULTIPLE, buckets: bool = False) -> int:
    """Round a length up to a multiple; with length `buckets` (engine.compile), to the next power of two (>= 16),
    so a compiled graph is reused, not rebuilt for every length."""
    if buckets:
        return max(16, 1 << max(0, length - 1).bit_length())
    return ((length + multiple - 1) // multiple) * multiple


def pad_sequences(
    sequences: Sequence[Sequence[int]],
    pad_value: int,
    length: Optional[int] = None,
    side: str = "right",
    buckets: bool = False,
) -> torch.Tensor:
    """A [batch, length] LongTensor of right- (or left-) padded sequences (see `pad_multiple` for `buckets`)."""
    length = length or pad_multiple(max(len(s) for s in sequences), buckets=buckets)
    out = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        seq = list(seq)[:length]
        if side == "right":
            out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        elif seq:
            out[row, -len(seq) :] = torch.tensor(seq, dtype=torch.long)
    return out


def pack_best_fit(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: longest first, each into the fullest row it still fits; never splits an example."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted: the best fit is the first with room
    for index in order:
        length = min(lengths[index], max_length)
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            space, row = free.pop(slot)
            rows[row].append(index)
            bisect.insort(free, (space - length, row))
        else:
            rows.append([index])
            bisect.insort(free, (max_length - length, len(rows) - 1))
    for row in rows:
        row.sort()  # examples keep their data order inside a row
    rows.sort(key=lambda r: r[0])
    return rows


def packing_efficiency(lengths: list[int], rows: list[list[int]], max_length: int) -> float:
    """Non-pad tokens / slot tokens (rows × max_length)."""
    return sum(lengths[i] for row in rows for i in row) / max(1, len(rows) * max_length)


def packed_attention(segments: torch.Tensor, dtype: torch.dtype, shared: Optional[int] = None) -> torch.Tensor:
    """Additive [B, 1, T, T] mask: causal, and only within an example (block-diagonal); padding is segment -1.
    `shared`: a segment every example also sees (a prompt that several completions continue)."""
    same = segments[:, :, None] == segments[:, None, :]
    if shared is not None:
        same |= segments[:, None, :] == shared
    length = segments.shape[1]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=segments.device))
    allowed = same & causal & (segments[:, :, None] >= 0)
    allowed |= torch.eye(length, dtype=torch.bool, device=segments.device)  # padding rows attend to themselves
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )[:, None]


class PackedRows:
    """A list of packed rows that DataLoader can index (each row: lists of examples' fields)."""

    def __init__(self, rows: list[dict[str, list]], efficiency: Optional[float] = None):
        self.rows = rows
        self.efficiency = efficiency

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list]:
        return self.rows[index]

    def lengths(self) -> list[int]:
        return [sum(len(e) for e in r["input_ids"]) for r in self.rows]


def isolation_mode(model: Any, vocab: int) -> Optional[str]:
    """How this backbone keeps packed examples apart: `position_ids` (padding-free), `mask` (dense), or None.

    Runs two short random examples alone and packed, and compares the logits.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randint(vocab, (1, 5), generator=generator), torch.randint(vocab, (1, 7), generator=generator)
    positions = torch.tensor([list(range(5)) + list(range(7))])
    segments = torch.tensor([[0] * 5 + [1] * 7])
    found = None
    try:
        with torch.no_grad():
            alone = torch.cat(
                [model(input_ids=a, use_cache=False).logits, model(input_ids=b, use_cache=False).logits], 1
            )
            packed = torch.cat([a, b], 1)
            for mode in ("position_ids", "mask"):
                extra = {"attention_mask": packed_attention(segments, torch.float32)} if mode == "mask" else {}
                try:
                    logits = model(input_ids=packed, position_ids=positions, use_cache=False, **extra).logits
                except Exception:  # a model that rejects 4-D masks or position_ids
                    continue
                if torch.allclose(alone, logits, atol=1e-4, rtol=1e-3):
                    found = mode
                    break
    finally:
        model.train(was_training)
    return found
