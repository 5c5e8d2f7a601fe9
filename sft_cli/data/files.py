"""Which files a `data.train` / `data.eval` value names: a file, a glob, a list, or a directory of shards.

Compressed text (`.gz`, `.bz2`, `.xz`, `.zst`) counts as its inner format (`corpus/*.jsonl.gz` is jsonl);
every file of one split must share one format. Saved datasets and image folders stay directories.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import hashlib
import lzma
from pathlib import Path
from typing import IO, Any, Optional, Sequence

from sft_cli.errors import SftError

EXTENSIONS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".conll": "conll",  # one word per line, its tag in the last column, a blank line between sentences
    ".iob": "conll",
    ".bio": "conll",
}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
GLOB_CHARACTERS = set("*?[")


def split_suffix(path: Path) -> tuple[str, Optional[str]]:
    """(data extension, compression extension or None): `a.jsonl.gz` -> ('.jsonl', '.gz')."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        return (suffixes[-2] if len(suffixes) > 1 else ""), suffixes[-1]
    return (suffixes[-1] if suffixes else ""), None


def builder_of(path: Path) -> Optional[str]:
    """The datasets builder for a data file (json/csv/parquet/text), None when not a data file."""
    extension, compression = split_suffix(path)
    builder = EXTENSIONS.get(extension)
    if builder == "parquet" and compression:
        return None  # parquet compresses inside the file
    return builder


def is_data_location(location: Any) -> bool:
    """True when the value names data files (a list, a glob, a data file, or a directory of data files)."""
    if isinstance(location, (list, tuple)):
        return True
    text = str(location)
    if GLOB_CHARACTERS & set(text):
        return True
    path = Path(text).expanduser()
    if builder_of(path) is not None:
        return True
    return path.is_dir() and not _special_directory(path) and any(_data_files_under(path))


def _special_directory(path: Path) -> bool:
    """A `save_to_disk` dataset directory (loaded as one table, not as files)."""
    return (path / "dataset_info.json").exists() or (path / "state.json").exists()


def _data_files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and builder_of(p) and not p.name.startswith("."))


def resolve_files(location: Any, key: str) -> tuple[str, list[Path]]:
    """(builder, files) for a file, glob, list or directory of data files; one-line errors naming `key`."""
    parts: Sequence[Any] = location if isinstance(location, (list, tuple)) else [location]
    if not parts:
        raise SftError(f"{key}: the list of files is empty")
    files: list[Path] = []
    for part in parts:
        text = str(part)
        path = Path(text).expanduser()
        if GLOB_CHARACTERS & set(text):
            matched = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not matched:
                raise SftError(f"{key}: {text} matches no file — check the pattern and the working directory")
            files += matched
        elif path.is_dir():
            found = _data_files_under(path)
            if not found:
                known = ", ".join(EXTENSIONS)
                raise SftError(f"{key}: {path} holds no data files ({known}, optionally .gz/.bz2/.xz/.zst)")
            files += found
        elif not path.is_file():
            raise SftError(f"{key}: file not found: {path}")
        else:
            files.append(path)
    builders = {}
    for path in files:
        builder = builder_of(path)
        if builder is None:
            known = ", ".join(EXTENSIONS)
            raise SftError(f"{key}: {path} — unsupported format; use {known} (optionally .gz/.bz2/.xz/.zst)")
        builders.setdefault(builder, path)
    if len(builders) > 1:
        shown = ", ".join(f"{b} ({p.name})" for b, p in builders.items())
        raise SftError(f"{key}: the files mix formats ({shown}) — give one format per split")
    for path in files:
        if path.stat().st_size == 0:
            raise SftError(f"{key}: {path} is empty")
    return next(iter(builders)), list(dict.fromkeys(files))


def open_text(path: Path) -> IO[str]:
    """Open a (possibly compressed) text file for reading as UTF-8."""
    _, compression = split_suffix(path)
    if compression == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if compression == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8")
    if compression == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    if compression == ".zst":
        try:
            import zstandard
        except ImportError:
            raise SftError(f"{path}: reading .zst needs the zstandard package — pip install zstandard") from None
        import io

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    return open(path, encoding="utf-8")


def content_hash(files: Sequence[Path]) -> str:
    """A hash of the files' sizes, modification times and content samples (first and last MiB).

    Sampling keeps it cheap on a 50 GB corpus; any rewrite changes the modification time, so it shows.
    """
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}|".encode())
        sample_into(digest, path)
    return digest.hexdigest()[:16]


def sample_into(digest: Any, path: Path) -> None:
    """Feed a file's first and last MiB to a hash (cheap on any size; a rewrite almost surely changes them)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(size - (1 << 20))
            digest.update(f.read(1 << 20))


def read_conll(paths: Sequence[Path], key: str) -> dict[str, list]:
    """CoNLL-style files as `tokens` and `tags` columns: a word per line with its tag in the last column, a blank
    line between sentences, `-DOCSTART-` lines skipped; a line without a tag is an error naming file and line."""
    tokens: list[list[str]] = []
    tags: list[list[str]] = []
    for path in paths:
        words: list[str] = []
        labels: list[str] = []
        with open_text(path) as f:
            for number, line in enumerate(f, 1):
                parts = line.split()
                if not parts or parts[0] == "-DOCSTART-":
                    if words:
                        tokens.append(words)
                        tags.append(labels)
                    words, labels = [], []
                    continue
                if len(parts) < 2:
                    raise SftError(
                        f"{key}: {path} line {number}: '{line.strip()}' has no tag — CoNLL lines are "
                        "'word ... tag' (tag in the last column), with a blank line between sentences"
                    )
                words.append(parts[0])
                labels.append(parts[-1])
        if words:
            tokens.append(words)
            tags.append(labels)
    return {"tokens": tokens, "tags": tags}
