"""Atomic files and directories: every write goes to a temporary sibling first and is renamed into place,
so a crash or a full disk never leaves a file that looks complete but is not; the previous one stays intact."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from sft_cli.errors import SftError, StorageError


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file via a temporary sibling and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(directory: Path, key: str, hint: str) -> None:
    """Fail early, naming the key, when `directory` cannot be created or written (a probe file, removed again)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise SftError(f"{key}: cannot write to {directory} ({err.strerror or err}) — {hint}") from None


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, default=float) + "\n")


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object file; {} when it is missing, unreadable, garbled or not an object (run files are read, not trusted)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def replace_directory(tmp: Path, final: Path) -> None:
    """Put the finished `tmp` in place of `final` in one rename (the old copy is removed afterwards)."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `final` in one rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
    try:
        yield tmp
        replace_directory(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(f"could not write {final}: {err.strerror or err} — the previous copy is intact") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
