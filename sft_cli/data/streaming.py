"""`data.streaming: true` for pretraining: the corpus read as a stream of token blocks, never held in memory.

Documents are dealt to ranks and dataloader workers by their global index (document i goes to shard
i mod shards), tokenized, joined with a separator and cut into blocks of `max_length`; blocks pass a seeded
shuffle buffer. Each epoch visits the files in a seeded order. Everything is a pure function of (files,
seed, rank, world), so a run resumes at its exact next block by skipping the blocks already trained —
tokenized again, never run through the model.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from sft_cli.data.files import open_text
from sft_cli.errors import SftError


def read_texts(path: Path, builder: str, field: str, skip_invalid: bool = False) -> Iterator[str]:
    """The `field` of each record of one data file, one at a time (blank lines of .txt files skipped).

    Null values are skipped; a value that is not a string is an error naming the record (skipped with
    `data.skip_invalid`), the rule for in-memory data too.
    """
    if builder == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(columns=[field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                if _is_text(value, path, f"'{field}'", skip_invalid):
                    yield value
        return
    with open_text(path) as f:
        if builder == "text":
            yield from (line.strip() for line in f if line.strip())
        elif builder == "csv":
            yield from (str(row[field]) for row in csv.DictReader(f) if row.get(field))
        else:  # json lines
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)[field]
                except (json.JSONDecodeError, TypeError, KeyError):
                    raise SftError(
                        f"data.train: {path} line {number} is not a JSON object with a '{field}' field"
                    ) from None
                if _is_text(value, path, f"line {number}: '{field}'", skip_invalid):
                    yield value


def _is_text(value: Any, path: Path, where: str, skip_invalid: bool) -> bool:
    if value is None or isinstance(value, str):
        return value is not None
    if skip_invalid:
        return False
    raise SftError(
        f"data.train: {path} {where} is {type(value).__name__}, not text — fix it, or set data.skip_invalid: true"
    )


class BlockStream(IterableDataset):
    """Endless collated batches of token blocks for one rank (split further across dataloader workers)."""

    def __init__(
        self,
        files: Sequence[Path],
        builder: str,
        field: str,
        encode: Callable[[str], list[int]],
        block: int,
        separator: int,
        batch_size: int,
        collate: Callable[[list[dict]], Any],
        seed: int,
        rank: int = 0,
        world: int = 1,
        buffer: int = 1000,
        skip_batches: int = 0,
        skip_invalid: bool = False,
    ):
        self.files, self.builder, self.field = list(files), builder, field
        self.skip_invalid = skip_invalid
        self.encode, self.block, self.separator = encode, block, separator
        self.batch_size, self.collate = batch_size, collate
        self.seed, self.rank, self.world, self.buffer = seed, rank, world, buffer
        self.skip_batches = skip_batches

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes batches from its workers in turn, starting with worker 0: after k batches the
        # next one is role k mod workers's, so worker w of a resumed loader plays role (w + k) mod workers.
        role = (worker + self.skip_batches) % workers
        skip = self.skip_batches // workers + (1 if role < self.skip_batches % workers else 0)
        rows = self.rows(self.rank * workers + role, self.world * workers)
        for _ in range(skip * self.batch_size):  # fast-forward: tokenized again, not trained on
            next(rows)
        while True:
            yield self.batch([next(rows) for _ in range(self.batch_size)])

    def rows(self, shard: int, shards: int) -> Iterator[dict]:
        """This shard's training rows, one token block each."""
        return ({"input_ids": block} for block in self.blocks(shard, shards))

    def batch(self, rows: list[dict]) -> Any:
        """Collate rows into a training batch."""
        return self.collate(rows)

    def blocks(self, shard: int, shards: int) -> Iterator[list[int]]:
        """This shard's shuffled blocks, epoch after epoch."""
        epoch = 0
        while True:
            rng = np.random.default_rng([self.seed, epoch, shard])
            produced = 0
            for block in _shuffled(self._epoch_blocks(epoch, shard, shards), rng, self.buffer):
                produced += 1
                yield block
            if not produced:
                raise SftError(
                    f"data.train: too little text for {shards} stream shard(s) of {self.block} tokens — "
                    "lower data.max_length or use fewer processes/workers"
                )
            epoch += 1

    def _epoch_blocks(self, epoch: int, shard: int, shards: int) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.files))
        pending: list[int] = []
        document = 0
        for index in order:
            for text in read_texts(self.files[index], self.builder, self.field, self.skip_invalid):
                if document % shards == shard:
                    pending += self.encode(text) + [self.separator]
                    while len(pending) >= self.block:
                        yield pending[: self.block]
                        pending = pending[self.block :]
                document += 1


class MixedBlockStream(BlockStream):
    """A `data.train` mixture as a stream: each block comes from a source drawn by weight (seeded per shard).

    Every source keeps its own files, fields and shuffle buffer; the draw is a pure function of (seed, shard),
    so resume skips exactly as for one source. Batches carry each row's source and tokens for summary.json.
    """

    def __init__(self, streams: Sequence[BlockStream], weights: Sequence[float]):
        first = streams[0]
        super().__init__(
            first.files, first.builder, first.field, first.encode, first.block, first.separator, first.batch_size,
            first.collate, first.seed, first.rank, first.world, first.buffer, first.skip_batches, first.skip_invalid,
        )  # fmt: skip
        self.streams, self.weights = list(streams), list(weights)

    def rows(self, shard: int, shards: int) -> Iterator[dict]:
        from sft_cli.data.mixture import interleave

        sources = [stream.blocks(shard, shards) for stream in self.streams]
        for source, block in interleave(sources, self.weights, self.seed, shard):
            yield {"input_ids": block, "source": source}

    def batch(self, rows: list[dict]) -> Any:
        batch = self.collate([{"input_ids": row["input_ids"]} for row in rows])
        batch["mixture_source"] = torch.tensor([row["source"] for row in rows])
        batch["mixture_tokens"] = torch.tensor([len(row["input_ids"]) for row in rows])
        return batch


def _shuffled(items: Iterator[list[int]], rng: np.random.Generator, size: int) -> Iterator[list[int]]:
    """A seeded shuffle buffer: holds `size` items, yields a random one as each new item arrives."""
    buffer: list[list[int]] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        pick = int(rng.integers(size))
        yield buffer[pick]
        buffer[pick] = item
    for pick in rng.permutation(len(buffer)):
        yield buffer[pick]


def stream_loader(stream: BlockStream, num_workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader over a BlockStream (batches are built in the stream)."""
    # a private generator: creating the iterator must not draw from the global RNG (dropout), or resume drifts
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers, generator=torch.Generator())
