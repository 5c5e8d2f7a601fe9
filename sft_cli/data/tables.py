"""Load examples from local files, saved datasets or hub names; batch them by length.

Everything here is task-agnostic: tasks map raw rows to model features, this module finds the rows,
caches the mapping, and orders examples into batches deterministically (so resume can skip exactly).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import datasets
import numpy as np

from sft_cli.data.files import EXTENSIONS, is_data_location, open_text, read_conll, resolve_files, split_suffix
from sft_cli.environment import hub_offline
from sft_cli.errors import SftError

log = logging.getLogger("sft")

# A hub dataset id, optionally with a split: `imdb`, `trl-lib/Capybara`, `trl-lib/Capybara:test`.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _check_utf8(path: Path, key: str) -> None:
    """Fail early, naming the file, when a text file is not UTF-8."""
    if split_suffix(path)[1] is not None:  # compressed: check the decompressed head
        try:
            with open_text(path) as f:
                f.read(1 << 20)
        except UnicodeDecodeError as err:
            raise SftError(f"{key}: {path} is not UTF-8 text ({err.reason}) — re-save it as UTF-8") from None
        except (OSError, EOFError, ValueError) as err:
            raise SftError(f"{key}: {path} could not be decompressed ({err}) — is the file complete?") from None
        return
    with open(path, "rb") as f:
        chunk = f.read(1 << 20)
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError as err:
        if len(chunk) - err.start > 4:  # not a multibyte character cut at the chunk end
            raise SftError(f"{key}: {path} is not UTF-8 text (byte {err.start}) — re-save it as UTF-8") from None


@dataclass(frozen=True)
class DataCache:
    """Where parsed data is cached (None: the datasets library's own cache) and how many workers fill it
    (data.num_proc); passed to every load and map, never kept in a global."""

    directory: Optional[str] = None
    num_proc: Optional[int] = None

    def workers(self, work_items: int) -> Optional[int]:
        """data.num_proc workers when there is enough work to share (datasets refuses more workers than shards)."""
        wanted = self.num_proc
        return min(wanted, work_items) if wanted and wanted > 1 and work_items > 1 else None


def load_table(location: Any, key: str, cache: DataCache = DataCache()) -> datasets.Dataset:
    """Load one split: data files (a file, glob, list or directory of shards, compressed or not), a
    `save_to_disk` directory, an image folder, or a hub name."""
    if is_data_location(location):
        table = _load_files(location, key, cache)
    else:
        path = Path(str(location)).expanduser()
        if path.is_dir():
            table = _load_directory(path, key, cache)
        elif HUB_ID.match(str(location)) and not path.exists() and not str(location).startswith((".", "/", "~")):
            table = _load_hub(str(location), key, cache)
        else:
            known = ", ".join(EXTENSIONS)
            raise SftError(
                f"{key}: {location} — not found or unsupported format; use one of {known}, a glob, or a directory"
            )
    if len(table) == 0:
        raise SftError(f"{key}: {location} has no examples")
    return table


def _load_directory(path: Path, key: str, cache: DataCache) -> datasets.Dataset:
    """A `save_to_disk` dataset or an image folder."""
    if (path / "dataset_info.json").exists() or (path / "state.json").exists():
        table = datasets.load_from_disk(str(path))
        if isinstance(table, datasets.DatasetDict):
            raise SftError(f"{key}: {path} holds several splits ({', '.join(table)}); point at one")
        return table
    if any(child.is_dir() or child.suffix.lower() in IMAGE_EXTENSIONS for child in path.iterdir()):
        return datasets.load_dataset("imagefolder", data_dir=str(path), split="train", cache_dir=cache.directory)
    raise SftError(f"{key}: {path} is neither a saved dataset, a directory of data files, nor an image folder")


def _load_files(location: Any, key: str, cache: DataCache) -> datasets.Dataset:
    """Read data files through the datasets library (Arrow on disk, memory-mapped), one-line errors."""
    builder, files = resolve_files(location, key)
    if builder in ("json", "csv", "text", "conll"):
        for path in files:
            _check_utf8(path, key)
    if builder == "conll":
        return datasets.Dataset.from_dict(read_conll(files, key))
    try:
        table = datasets.load_dataset(
            builder,
            data_files=[str(p) for p in files],
            split="train",
            cache_dir=cache.directory,
            num_proc=cache.workers(len(files)),
        )
    except SftError:
        raise
    except Exception as err:  # datasets raises many types for malformed files
        for path in files:
            if split_suffix(path)[0] == ".jsonl":
                _raise_on_bad_json_line(path, key)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        shown = files[0] if len(files) == 1 else f"{len(files)} files ({files[0]}, ...)"
        raise SftError(f"{key}: could not read {shown} as {builder}: {first}") from None
    if builder == "text":  # one example per non-blank line, stripped
        table = table.map(
            lambda rows: {"text": [t.strip() for t in rows["text"] if t.strip()]},
            batched=True,
            num_proc=cache.workers(len(table) // 10_000),
            desc="reading lines",
        )
    return table


def _raise_on_bad_json_line(path: Path, key: str) -> None:
    """Name the first line of a .jsonl file that is not a JSON object."""
    with open_text(path) as f:
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


def _load_hub(location: str, key: str, cache: DataCache) -> datasets.Dataset:
    """A dataset from the Hugging Face hub (or its local cache when offline); `org/name:split` picks a split,
    `org/name:config:split` a configuration too (`wmt/wmt16:de-en:train`)."""
    name, *rest = location.split(":")
    config, split = (rest[0], rest[1]) if len(rest) >= 2 else (None, rest[0] if rest else "")
    try:
        return datasets.load_dataset(name, config, split=split or "train", cache_dir=cache.directory)
    except Exception:
        offline = " (HF_HUB_OFFLINE is set, so only the local cache is searched)" if hub_offline() else ""
        raise SftError(
            f"{key}: '{location}' is not a local file or directory, nor a reachable hub dataset{offline}"
        ) from None


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


def keep_usable(
    encoded: datasets.Dataset, key: str, location: str, skipped: SkipCounter, unit: str
) -> datasets.Dataset:
    """Count an encoded split's rows by their `skip` reason and keep the usable ones; none usable is an error."""
    reasons = encoded["skip"]
    for reason in sorted(set(reasons) - {""}):
        skipped.add(key, reason, reasons.count(reason))
    if all(reasons):
        raise SftError(f"{key}: no usable {unit} in {location} ({skipped.describe(key)})")
    kept = [index for index, reason in enumerate(reasons) if not reason]
    if len(kept) < len(reasons):
        encoded = encoded.select(kept)
    return encoded.remove_columns("skip")


def drop_null_rows(
    table: datasets.Dataset,
    fields: Sequence[str],
    key: str,
    skipped: SkipCounter,
    text_fields: Sequence[str] = (),
    skip_invalid: bool = False,
) -> datasets.Dataset:
    """Leave out rows where a needed field is null, counting them; refuse a split with no usable row.

    A null label would silently drop out of the loss and a null text would train as an empty string;
    here both are counted per reason (the first null field of a row) and reported. A `text_fields` value
    that is not a string (a number, list, object) is an error naming the row, or with `data.skip_invalid`
    skipped and counted — the rule `sft predict` applies to its input too.
    """
    import pyarrow.compute as pc

    if table._indices is not None:
        table = table.flatten_indices()
    unusable = np.zeros(len(table), dtype=bool)
    for field in text_fields:
        bad = non_text_rows(table, field)
        if bad and not skip_invalid:
            kind = type(table[bad[0]][field]).__name__
            raise SftError(
                f"{key}: row {bad[0] + 1}: '{field}' is {kind}, not text — fix the row, or set data.skip_invalid: "
                "true to skip such rows"
            )
        skipped.add(key, f"non-string {field}", len(bad))
        unusable[bad] = True
    for field in fields:
        null = pc.is_null(table.data.column(field)).to_numpy(zero_copy_only=False) & ~unusable
        skipped.add(key, f"null {field}", int(null.sum()))
        unusable |= null
    if unusable.all():
        raise SftError(f"{key}: no usable row — all {len(table)} are null or invalid ({skipped.describe(key)})")
    return table.select(np.flatnonzero(~unusable)) if unusable.any() else table


def non_text_rows(table: datasets.Dataset, field: str) -> list[int]:
    """Indices of rows whose `field` holds something other than a string or null (a JSON column keeps types)."""
    feature = table.features.get(field)
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "null"):
        return []
    return [i for i, value in enumerate(table[field]) if value is not None and not isinstance(value, str)]


def text_problem(value: Any, field: str) -> Optional[str]:
    """Why a single value cannot be used as text (`null text`, `non-string text`), or None."""
    if value is None:
        return f"null {field}"
    return None if isinstance(value, str) else f"non-string {field}"


def fingerprint(*parts: object) -> str:
    """A short stable hash of anything JSON can express; keys the tokenization cache."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


_TOKENIZED = {"rows": 0}  # rows this process tokenized (not read from the cache): proves "tokenize once"


def tokenizing_stats() -> int:
    """How many rows this process has tokenized itself so far (cache hits excluded)."""
    return _TOKENIZED["rows"]


def cached_map(
    table: datasets.Dataset,
    fn: Callable[..., dict],
    key: str,
    remove: bool = True,
    with_indices: bool = False,
    cache: DataCache = DataCache(),
) -> datasets.Dataset:
    """`datasets.map` in batches with a cache fingerprint that names data + tokenizer + settings.

    The result is stored beside the parsed data (under data.cache_dir); a later call with the same
    fingerprint reads it back instead of tokenizing.
    """
    new_fingerprint = fingerprint(table._fingerprint, key)
    if not _cached(table, new_fingerprint):
        _TOKENIZED["rows"] += len(table)
    return table.map(
        fn,
        batched=True,
        with_indices=with_indices,
        remove_columns=table.column_names if remove else None,
        new_fingerprint=new_fingerprint,
        num_proc=cache.workers(len(table) // 1000),
        desc="tokenizing",
    )


def _cached(table: datasets.Dataset, new_fingerprint: str) -> bool:
    """Whether `map` will read this result from its cache file (datasets names it cache-<fingerprint>*)."""
    if not table.cache_files:
        return False  # in-memory tables are mapped in memory every time
    directory = Path(table.cache_files[0]["filename"]).parent
    return any(directory.glob(f"cache-{new_fingerprint}*.arrow"))


def epoch_batches(
    lengths: Sequence[int] | None,
    num_examples: int,
    batch_size: int,
    seed: int,
    epoch: int,
    group_by_length: bool,
    population: Optional[np.ndarray] = None,
) -> list[list[int]]:
    """The batches of one epoch: a shuffled order, optionally grouped by length in mega-batches.

    Grouping sorts each run of 50 batches by length so padding is small while the batch order stays
    random; the result depends only on (seed, epoch), which is what lets resume skip exactly. `population`
    (a mixture's rows of this epoch, repeats allowed) replaces range(num_examples).
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_examples)
    if population is not None:
        order = np.asarray(population)[order]
    if group_by_length and lengths is not None:
        lengths_arr = np.asarray(lengths)
        mega = batch_size * 50
        chunks = [order[i : i + mega] for i in range(0, num_examples, mega)]
        order = np.concatenate([c[np.argsort(-lengths_arr[c], kind="stable")] for c in chunks])
        batches = [order[i : i + batch_size].tolist() for i in range(0, num_examples, batch_size)]
        perm = rng.permutation(len(batches))
        return [batches[i] for i in perm]
    return [order[i : i + batch_size].tolist() for i in range(0, num_examples, batch_size)]


def shard_batches(batches: list[list[int]], world: int) -> list[list[list[int]]]:
    """Each rank's batches: the same number per rank (so no rank waits in a collective at the epoch end),
    none empty, and every example exactly once (no wrap-around padding).

    Batches go round-robin (a short batch moved last); a final round with fewer batches than ranks is pooled and split evenly
    (when it holds fewer examples than ranks, they join the previous round's batches instead).
    """
    if world == 1:
        return [batches]
    size = max(len(b) for b in batches)
    batches = [b for b in batches if len(b) == size] + [b for b in batches if len(b) < size]  # the short one last
    full = len(batches) // world * world
    rounds, tail = batches[:full], [i for batch in batches[full:] for i in batch]
    if tail and len(tail) < world:
        if not rounds:
            raise SftError(f"data.train: {len(tail)} example(s) cannot feed {world} processes — use fewer processes")
        rounds = [list(b) for b in rounds]
        for k, index in enumerate(tail):
            rounds[full - world + k].append(index)
        tail = []
    if tail:
        rounds += [part.tolist() for part in np.array_split(np.asarray(tail), world)]
    return [rounds[rank::world] for rank in range(world)]


def batches_per_rank(num_examples: int, batch_size: int, world: int) -> int:
    """How many batches `shard_batches` gives each rank for an epoch of `epoch_batches` (all full but the last)."""
    full = math.ceil(num_examples / batch_size) // world
    tail = num_examples - full * world * batch_size
    return full + (1 if tail >= world or (tail and not full) else 0)
