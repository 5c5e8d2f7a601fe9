"""Load examples from local files, saved datasets or hub names; batch them by length.

Everything here is task-agnostic: tasks map raw rows to model features, this module finds the rows,
caches the mapping, and orders examples into batches deterministically (so resume can skip exactly).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import datasets
import numpy as np

from sft_cli.errors import SftError

log = logging.getLogger("sft")

# A hub dataset id, optionally with a split: `imdb`, `trl-lib/Capybara`, `trl-lib/Capybara:test`.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
EXTENSIONS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def _check_utf8(path: Path, key: str) -> None:
    """Fail early, naming the file, when a text file is not UTF-8."""
    with open(path, "rb") as f:
        chunk = f.read(1 << 20)
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError as err:
        if len(chunk) - err.start > 4:  # not a multibyte character cut at the chunk end
            raise SftError(f"{key}: {path} is not UTF-8 text (byte {err.start}) — re-save it as UTF-8") from None


_CACHE: dict[str, Optional[str]] = {"dir": None}  # None: the datasets library's own cache


@contextmanager
def use_cache_dir(directory: Path) -> Iterator[None]:
    """Send the datasets cache (parsed files, tokenized maps) to `directory` for a while (`sft check`)."""
    previous = _CACHE["dir"]
    _CACHE["dir"] = str(directory)
    try:
        yield
    finally:
        _CACHE["dir"] = previous


def load_table(location: str, key: str) -> datasets.Dataset:
    """Load one split from a file, a `save_to_disk` directory, an image folder, or a hub name."""
    path = Path(location).expanduser()
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            table = datasets.load_from_disk(str(path))
            if isinstance(table, datasets.DatasetDict):
                raise SftError(f"{key}: {path} holds several splits ({', '.join(table)}); point at one")
        elif any(child.is_dir() or child.suffix.lower() in IMAGE_EXTENSIONS for child in path.iterdir()):
            table = datasets.load_dataset("imagefolder", data_dir=str(path), split="train", cache_dir=_CACHE["dir"])
        else:
            raise SftError(f"{key}: {path} is neither a saved dataset nor an image folder")
    elif path.suffix.lower() in EXTENSIONS:
        if not path.is_file():
            raise SftError(f"{key}: file not found: {path}")
        if EXTENSIONS[path.suffix.lower()] in ("json", "csv", "text"):
            _check_utf8(path, key)
        table = _load_file(path, key)
    elif HUB_ID.match(location) and not path.exists() and not location.startswith((".", "/", "~")):
        table = _load_hub(location, key)
    else:
        known = ", ".join(EXTENSIONS)
        raise SftError(f"{key}: {location} — not found or unsupported format; use one of {known}, or a directory")
    if len(table) == 0:
        raise SftError(f"{key}: {location} has no examples")
    return table


def _load_file(path: Path, key: str) -> datasets.Dataset:
    """Read a local data file, turning parser failures into one-line errors."""
    builder = EXTENSIONS[path.suffix.lower()]
    if path.stat().st_size == 0:
        raise SftError(f"{key}: {path} is empty")
    if builder == "text":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        return datasets.Dataset.from_dict({"text": [line for line in lines if line]})
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=_CACHE["dir"])
    except Exception as err:  # datasets raises many types for malformed files
        if path.suffix.lower() == ".jsonl":
            _raise_on_bad_json_line(path, key)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SftError(f"{key}: could not read {path} as {builder}: {first}") from None


def _raise_on_bad_json_line(path: Path, key: str) -> None:
    """Name the first line of a .jsonl file that is not a JSON object."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise SftError(
                    f"{key}: {path} line {number} is not valid JSON ({err.msg}) — fix or remove that line"
                ) from None
            if not isinstance(value, dict):
                raise SftError(
                    f'{key}: {path} line {number} is not a JSON object — each line must be {{"field": value, ...}}'
                )


def _load_hub(location: str, key: str) -> datasets.Dataset:
    """A dataset from the Hugging Face hub (or its local cache when offline); `org/name:split` picks a split."""
    name, _, split = location.partition(":")
    try:
        return datasets.load_dataset(name, split=split or "train", cache_dir=_CACHE["dir"])
    except Exception:
        offline = " (HF_HUB_OFFLINE is set, so only the local cache is searched)" if _offline() else ""
        raise SftError(
            f"{key}: '{location}' is not a local file or directory, nor a reachable hub dataset{offline}"
        ) from None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def require_columns(table: datasets.Dataset, columns: Sequence[str], key: str, source: str) -> None:
    """Fail, listing what exists, when a needed column is missing."""
    require_columns_named(table.column_names, columns, key, source)


def require_columns_named(present: Sequence[str], columns: Sequence[str], key: str, source: str) -> None:
    """`require_columns` over a list of column names."""
    for column in columns:
        if column not in present:
            raise SftError(f"{key}='{column}': no such column in {source} (columns: {', '.join(present)})")


class SkipCounter:
    """Rows left out of a split, by split key and reason; reported by `sft plan` and summary.json."""

    def __init__(self) -> None:
        self.by_split: dict[str, dict[str, int]] = {}

    def add(self, key: str, reason: str, count: int = 1) -> None:
        if count:
            reasons = self.by_split.setdefault(key, {})
            reasons[reason] = reasons.get(reason, 0) + count

    def count(self, key: str) -> int:
        return sum(self.by_split.get(key, {}).values())

    def total(self) -> int:
        return sum(self.count(key) for key in self.by_split)

    def describe(self, key: str) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in self.by_split.get(key, {}).items())


def drop_null_rows(table: datasets.Dataset, fields: Sequence[str], key: str, skipped: SkipCounter) -> datasets.Dataset:
    """Leave out rows where a needed field is null, counting them; refuse a split with no usable row.

    A null label would silently drop out of the loss and a null text would train as an empty string;
    here both are counted per reason (the first null field of a row) and reported.
    """
    import pyarrow.compute as pc

    if table._indices is not None:
        table = table.flatten_indices()
    unusable = np.zeros(len(table), dtype=bool)
    for field in fields:
        null = pc.is_null(table.data.column(field)).to_numpy(zero_copy_only=False) & ~unusable
        skipped.add(key, f"null {field}", int(null.sum()))
        unusable |= null
    if unusable.all():
        raise SftError(
            f"{key}: no usable row — all {len(table)} have a null {' or '.join(fields)} ({skipped.describe(key)})"
        )
    return table.select(np.flatnonzero(~unusable)) if unusable.any() else table


def fingerprint(*parts: object) -> str:
    """A short stable hash of anything JSON can express; keys the tokenization cache."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_map(
    table: datasets.Dataset, fn: Callable[..., dict], key: str, remove: bool = True, with_indices: bool = False
) -> datasets.Dataset:
    """`datasets.map` in batches with a cache fingerprint that names data + tokenizer + settings."""
    return table.map(
        fn,
        batched=True,
        with_indices=with_indices,
        remove_columns=table.column_names if remove else None,
        new_fingerprint=fingerprint(table._fingerprint, key),
        desc="tokenizing",
    )


def epoch_batches(
    lengths: Sequence[int] | None, num_examples: int, batch_size: int, seed: int, epoch: int, group_by_length: bool
) -> list[list[int]]:
    """The batches of one epoch: a shuffled order, optionally grouped by length in mega-batches.

    Grouping sorts each run of 50 batches by length so padding is small while the batch order stays
    random; the result depends only on (seed, epoch), which is what lets resume skip exactly.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_examples)
    if group_by_length and lengths is not None:
        lengths_arr = np.asarray(lengths)
        mega = batch_size * 50
        chunks = [order[i : i + mega] for i in range(0, num_examples, mega)]
        order = np.concatenate([c[np.argsort(-lengths_arr[c], kind="stable")] for c in chunks])
        batches = [order[i : i + batch_size].tolist() for i in range(0, num_examples, batch_size)]
        perm = rng.permutation(len(batches))
        return [batches[i] for i in perm]
    return [order[i : i + batch_size].tolist() for i in range(0, num_examples, batch_size)]
