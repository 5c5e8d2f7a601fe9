"""Tokenize once: the prepared-data cache (`data.cache_dir`) and `sft prepare`.

Parsed files and tokenized (packed) tables live under the cache directory, keyed by a hash of the data
files' content + the tokenizer + the task settings. The first process to need a key fills it while holding
a file lock; every other process (other ranks, later runs) blocks on that lock — no collective, so no
NCCL/gloo timeout however long tokenizing takes — and then reads the cache without tokenizing again.
"""

from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from sft_cli.config.schema import Recipe
from sft_cli.data.files import content_hash, is_data_location, resolve_files
from sft_cli.data.mixture import sources
from sft_cli.data.tables import DataCache, fingerprint, tokenizing_stats

log = logging.getLogger("sft")


def cache_root(recipe: Recipe) -> Path:
    """data.cache_dir, or `.sft-cache` beside the run directory (shared by the runs of one parent)."""
    if recipe.data.cache_dir:
        return Path(recipe.data.cache_dir).expanduser()
    return Path(recipe.output.dir).expanduser().resolve().parent / ".sft-cache"


def data_key(recipe: Recipe) -> str:
    """What the prepared data depends on: the files' content, the tokenizer and the task's data settings."""
    stamps: dict[str, Any] = {}
    mix = sources(recipe.data)
    if mix is not None:  # each source's content and its own data keys (weights only sample: not part of the key)
        stamps["train"] = [[_stamp(s.path, s.key), sorted(s.fields.items())] for s in mix]
    for name in ("train", "eval", "unlabeled")[1 if mix else 0 :]:
        location = getattr(recipe.data, name)
        if location is not None:
            stamps[name] = _stamp(location, f"data.{name}")
    data = {k: v for k, v in vars(recipe.data).items() if k not in ("train", "eval", "unlabeled", "cache_dir")}
    return fingerprint(
        stamps,
        recipe.task,
        recipe.objective,
        vars(recipe.backbone),
        vars(recipe.tokenizer),
        data,
        recipe.loss.train_on,
    )


def _stamp(location: Any, key: str) -> list[str]:
    """What a data location's content is: its files' hashes, or a saved dataset's / hub name's stamp."""
    if is_data_location(location):
        builder, files = resolve_files(location, key)
        return [builder, content_hash(files)]
    return [str(location), _directory_stamp(Path(str(location)).expanduser())]


def _directory_stamp(path: Path) -> str:
    """A saved dataset or image folder changes when its files do: names, sizes and modification times."""
    if not path.is_dir():
        return ""
    stats = sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))
    return fingerprint(stats)


@contextmanager
def tokenize_once(recipe: Recipe, scratch: Optional[Path] = None) -> Iterator[tuple[Path, str, DataCache]]:
    """Run the data setup inside this: the first process to need the key fills the cache, the rest reuse it.

    Yields (cache root, data key, the data cache to load and map with); `scratch` (`sft check`) sends the parsed
    and tokenized data there instead of under the cache root."""
    root = cache_root(recipe)
    root.mkdir(parents=True, exist_ok=True)
    key = data_key(recipe)
    ready = root / f"{key}.ready"
    cache = DataCache(str(scratch or root / "datasets"), recipe.data.num_proc)
    if ready.exists():
        yield root, key, cache
        return
    with open(root / f"{key}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocks while another process tokenizes (no timeout)
        if ready.exists():
            fcntl.flock(handle, fcntl.LOCK_UN)
            yield root, key, cache
            return
        yield root, key, cache
        tmp = ready.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(key)
        os.replace(tmp, ready)


def prepare(recipe: Recipe) -> dict[str, Any]:
    """`sft prepare`: parse and tokenize (and for pretraining pack) every split once, into the cache."""
    from sft_cli.tasks.registry import build_task

    before = tokenizing_stats()
    task = build_task(recipe)
    with tokenize_once(recipe) as (root, key, cache):
        task.data_cache = cache
        task.computes = False  # tokenize and cache, never run the model over the data
        task.setup(train=True)
    return {
        "cache_dir": str(root),
        "key": key,
        "tokenized_rows": tokenizing_stats() - before,
        "train_examples": len(task.train_set) if task.train_set is not None else 0,
        "eval_examples": len(task.eval_set) if task.eval_set is not None else 0,
        "skipped_rows": task.skipped.total(),
    }
