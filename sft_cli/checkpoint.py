"""Atomic files and directories, training checkpoints, and resume.

Every write goes to a temporary sibling first and is renamed into place, so a crash or a full disk
never leaves a file or checkpoint that looks complete but is not; the previous one stays intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from sft_cli.errors import SftError

COMPLETE_MARK = "complete.json"


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


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, default=float) + "\n")


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
        raise SftError(f"could not write {final}: {err.strerror or err} — the previous copy is intact") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states (CUDA too when present)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    directory: Path, step: int, state: dict[str, Any], write_model: Callable[[Path], None], keep: int
) -> Path:
    """Save model + optimizer/scheduler/RNG/progress as checkpoints/step-N, atomically; prune old ones."""
    final = directory / f"step-{step:08d}"
    with atomic_directory(final) as tmp:
        write_model(tmp / "model")
        torch.save(state, tmp / "trainer_state.pt")
        write_json_atomic(tmp / COMPLETE_MARK, {"step": step})
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob("step-*") if (p / COMPLETE_MARK).exists()]
    return sorted(found, key=lambda p: p.name)


def find_resume_point(run_dir: Path, explicit: Optional[str]) -> Path:
    """The checkpoint to resume from: an explicit path, or the newest in the run's checkpoints/."""
    if explicit:
        path = Path(explicit)
        if not (path / COMPLETE_MARK).exists():
            raise SftError(f"--resume {path}: not a complete sft checkpoint (no {COMPLETE_MARK})")
        return path
    found = list_checkpoints(run_dir / "checkpoints")
    if not found:
        raise SftError(f"--resume: no checkpoint in {run_dir / 'checkpoints'} — start without --resume")
    return found[-1]


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The optimizer/scheduler/RNG/progress state saved beside the checkpoint's model."""
    return torch.load(checkpoint / "trainer_state.pt", weights_only=True, map_location="cpu")


def untie_shared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage (tied weights); clone the duplicates."""
    seen: dict[int, str] = {}
    out = {}
    for name, tensor in tensors.items():
        pointer = tensor.data_ptr()
        out[name] = tensor.clone() if pointer in seen else tensor
        seen.setdefault(pointer, name)
    return out
