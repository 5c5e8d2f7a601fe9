"""Weighted dataset mixtures: `data.train` as a list of sources, each with its own data keys.

An epoch of a mixture holds `quota` rows of each source: `num_samples` where given, else the weighted sources
share what is left of the mixture's size (the sum of its sources' rows) by weight; a source with neither keeps
its own size. A source's rows are drawn from an endless seeded stream of its permutations, so an undersampled
source shows different rows each epoch (all of them over enough epochs) and an oversampled one repeats whole
passes. Everything depends only on (seed, epoch): the position in the mix is the data position that resume keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from sft_cli.config.schema import MIXTURE_KEYS, DataConfig
from sft_cli.config.validation import is_mixture
from sft_cli.errors import SftError


@dataclass
class Source:
    """One entry of a `data.train` mixture."""

    index: int
    path: Any
    weight: Optional[float] = None
    num_samples: Optional[int] = None
    fields: dict[str, Any] = field(default_factory=dict)  # this source's data keys (format, fields, template, roles)

    @property
    def key(self) -> str:
        """How messages name it: data.train[i]."""
        return f"data.train[{self.index}]"


def sources(data: DataConfig) -> Optional[list[Source]]:
    """The mixture's sources, or None when data.train is one location (a path, glob or list of paths)."""
    train = data.train
    if not is_mixture(train):
        return None
    return [
        Source(
            index,
            entry["path"],
            entry.get("weight"),
            entry.get("num_samples"),
            {k: v for k, v in entry.items() if k not in MIXTURE_KEYS},
        )
        for index, entry in enumerate(train)
    ]


def source_data(data: DataConfig, source: Source) -> DataConfig:
    """The data config one source is read with: the recipe's, with its path and its own keys."""
    return replace(data, train=source.path, **source.fields)


def quotas(sizes: Sequence[int], mix: Sequence[Source]) -> list[int]:
    """Rows each source gives one epoch (largest remainder, so they add up exactly)."""
    counts = [
        s.num_samples if s.num_samples is not None else (size if s.weight is None else 0) for s, size in zip(mix, sizes)
    ]
    weighted = [i for i, s in enumerate(mix) if s.weight is not None and s.num_samples is None]
    if weighted:
        room = sum(sizes) - sum(counts)
        if room < len(weighted):
            names = ", ".join(mix[i].key for i in weighted)
            raise SftError(
                f"data.train: the sources with num_samples (or neither key) take {sum(counts):,} of the mixture's "
                f"{sum(sizes):,} rows per epoch, leaving none for {names} — lower num_samples, or give those sources "
                "num_samples too"
            )
        total = sum(mix[i].weight for i in weighted)
        exact = [room * mix[i].weight / total for i in weighted]
        floors = [max(1, int(x)) for x in exact]
        order = sorted(range(len(weighted)), key=lambda k: floors[k] - exact[k])
        for k in order[: max(0, room - sum(floors))]:
            floors[k] += 1
        for i, n in zip(weighted, floors):
            counts[i] = n
    return counts


class Mixture:
    """The sources of a concatenated training table, and which of its rows each epoch trains on."""

    def __init__(self, mix: Sequence[Source], sizes: Sequence[int], seed: int, streaming: bool = False):
        self.sources, self.sizes, self.seed, self.streaming = list(mix), list(sizes), seed, streaming
        self.quotas = quotas(sizes, mix) if not streaming else [0] * len(mix)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    @classmethod
    def stream(cls, mix: Sequence[Source], seed: int) -> Mixture:
        """A streamed mixture: no sizes, each block's source drawn by weight (a source without one weighs 1)."""
        return cls(mix, [0] * len(mix), seed, streaming=True)

    def weights(self) -> list[float]:
        """Each source's weight in a stream (a source without one weighs 1)."""
        return [1.0 if s.weight is None else float(s.weight) for s in self.sources]

    @property
    def epoch_size(self) -> int:
        """Rows in one epoch of the mixture."""
        return int(sum(self.quotas))

    def shares(self) -> list[float]:
        """Each source's share of an epoch's rows (of a stream's blocks)."""
        if self.streaming:
            return [w / sum(self.weights()) for w in self.weights()]
        return [q / max(self.epoch_size, 1) for q in self.quotas]

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """Indices into the concatenated table for this epoch (grouped by source; the batcher shuffles them)."""
        parts = [
            self.offsets[i] + _draw(self.sizes[i], self.seed, i, epoch * quota, quota)
            for i, quota in enumerate(self.quotas)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def source_of(self, indices: Any) -> np.ndarray:
        """The source number of each index into the concatenated table."""
        return np.searchsorted(self.offsets, np.asarray(indices), side="right") - 1

    def describe(self) -> list[dict[str, Any]]:
        """Per source: where it is, its rows, its rows per epoch and its share (`sft plan`, summary.json)."""
        if self.streaming:
            return [
                {"source": s.key, "path": str(s.path), "share": round(share, 4)}
                for s, share in zip(self.sources, self.shares())
            ]
        return [
            {"source": s.key, "path": str(s.path), "rows": size, "rows_per_epoch": quota, "share": round(share, 4)}
            for s, size, quota, share in zip(self.sources, self.sizes, self.quotas, self.shares())
        ]


def _draw(size: int, seed: int, source: int, start: int, count: int) -> np.ndarray:
    """Rows [start, start + count) of a source's endless stream of seeded permutations of range(size)."""
    if size == 0 or count == 0:
        return np.zeros(0, dtype=np.int64)
    out, position, lap = [], start, start // size
    while position < start + count:
        order = np.random.default_rng([seed, 7919, source, lap]).permutation(size)
        begin = position - lap * size
        take = min(size - begin, start + count - position)
        out.append(order[begin : begin + take])
        position += take
        lap += 1
    return np.concatenate(out)


def interleave(streams: Sequence[Iterator[Any]], weights: Sequence[float], seed: int, shard: int) -> Iterator[Any]:
    """Items from several endless streams, each next one from a source drawn by weight (seeded per shard)."""
    rng = np.random.default_rng([seed, 7919, shard])
    p = np.asarray(weights, dtype=float) / float(sum(weights))
    while True:
        source = int(rng.choice(len(streams), p=p))
        yield source, next(streams[source])
