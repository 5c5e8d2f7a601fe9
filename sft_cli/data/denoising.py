"""Corruptions that turn raw token blocks into (source, target) pairs for encoder-decoder pretraining.

- T5 span corruption (Raffel et al. 2020; Hugging Face's `run_t5_mlm_flax.py` collator): 15% of the tokens, in
  spans of mean length 3, each span replaced by one sentinel in the source; the target lists every sentinel
  followed by the tokens it hides. Source: `a b <s0> e <s1> h`, target: `<s0> c d <s1> f g`.
- BART text infilling (Lewis et al. 2020; fairseq's `denoising_dataset.py`): 30% of the tokens, in spans whose
  lengths are Poisson(3), each span (a zero-length one too) replaced by one mask token; the target is the whole
  original block.

Pure functions on lists of ids with a numpy generator: the callers seed it, so a batch's corruption is
reproducible (the same for every evaluation, and on resume).
"""

from __future__ import annotations

import numpy as np

NOISE_DENSITY = 0.15
MEAN_SPAN = 3.0
MASK_RATIO = 0.3
POISSON_LAMBDA = 3.0


def segment_lengths(total: int, segments: int, rng: np.random.Generator, minimum: int = 1) -> list[int]:
    """`segments` random lengths, each >= `minimum`, that add up to `total` (uniform over the cut points)."""
    spare = total - minimum * segments
    if segments <= 0 or spare < 0:
        raise ValueError(f"cannot split {total} items into {segments} segments of at least {minimum}")
    cuts = np.sort(rng.integers(0, spare + 1, size=segments - 1)) if segments > 1 else np.array([], dtype=int)
    bounds = np.concatenate([[0], cuts, [spare]])
    return [int(d) + minimum for d in np.diff(bounds)]


def span_corruption(
    ids: list[int],
    sentinels: list[int],
    rng: np.random.Generator,
    noise_density: float = NOISE_DENSITY,
    mean_span: float = MEAN_SPAN,
) -> tuple[list[int], list[int]]:
    """(source, target) of T5 span corruption; neither ends with EOS (the caller adds it)."""
    length = len(ids)
    noise = min(max(int(round(length * noise_density)), 1), length - 1) if length > 1 else 0
    if noise == 0:
        return list(ids), []
    spans = min(max(int(round(noise / mean_span)), 1), len(sentinels), length - noise)
    noise_lengths = segment_lengths(noise, spans, rng)
    keep_lengths = segment_lengths(length - noise, spans, rng)
    source: list[int] = []
    target: list[int] = []
    position = 0
    for span, (keep, hide) in enumerate(zip(keep_lengths, noise_lengths)):  # a kept run first, then a hidden span
        source += ids[position : position + keep] + [sentinels[span]]
        position += keep
        target += [sentinels[span]] + ids[position : position + hide]
        position += hide
    return source, target


def text_infilling(
    ids: list[int],
    mask_id: int,
    rng: np.random.Generator,
    mask_ratio: float = MASK_RATIO,
    poisson_lambda: float = POISSON_LAMBDA,
) -> list[int]:
    """The source of BART text infilling (the target is `ids` itself)."""
    length = len(ids)
    to_mask = int(round(length * mask_ratio))
    if to_mask == 0:
        return list(ids)
    spans: list[int] = []
    while sum(spans) < to_mask:
        spans.append(int(rng.poisson(poisson_lambda)))
    spans[-1] -= sum(spans) - to_mask  # the last span ends exactly at the budget
    while len(spans) > to_mask and 0 in spans:  # zero-length spans insert masks: never make the source longer
        spans.remove(0)
    keep_lengths = segment_lengths(length - to_mask, len(spans) + 1, rng, minimum=0)
    source: list[int] = []
    position = 0
    for keep, hide in zip(keep_lengths, spans):  # kept run, then one mask for the span (a zero-length one inserts it)
        source += ids[position : position + keep] + [mask_id]
        position += keep + hide
    return source + ids[position:]
