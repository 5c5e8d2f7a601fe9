"""Training checkpoints on disk: written atomically (a temporary directory renamed into place, with a checksum
mark), listed, checked, pruned and found again for resume."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from sft_cli.errors import SftError
from sft_cli.rundir.atomic import atomic_directory, write_json_atomic

COMPLETE_MARK = "complete.json"
# Leftovers of interrupted writes: temporary checkpoints/models, half-deleted checkpoints, renders, atomic files.
STALE = re.compile(r"^\.(tmp-|old-|del-step-|[a-z_-]+-render$|[\w.-]+\.(json|yaml|jsonl)\.\w+$)")
log = logging.getLogger("sft")


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


def checkpoint_dir(directory: Path, step: int) -> Path:
    """Where the checkpoint of `step` lives: checkpoints/step-NNNNNNNN (sorts by step)."""
    return directory / f"step-{step:08d}"


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], write_model: Callable[[Path], None]) -> Path:
    """Save model + optimizer/scheduler/RNG/progress as checkpoints/step-N, atomically, with checksums."""
    final = checkpoint_dir(directory, step)
    with atomic_directory(final) as tmp:
        write_model(tmp / "model")
        torch.save(state, tmp / "trainer_state.pt")
        mark_complete(tmp, step)
    return final


def mark_complete(tmp: Path, step: int, **extra: Any) -> None:
    """Write complete.json last: the step and every file's size and SHA-256, checked before a resume."""
    files = {
        p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(tmp.rglob("*"))
        if p.is_file()
    }
    write_json_atomic(tmp / COMPLETE_MARK, {"step": step, **extra, "files": files})


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            digest.update(block)
    return digest.hexdigest()


def prune_checkpoints(directory: Path, keep: int) -> list[Path]:
    """Remove all but the newest `keep` checkpoints; each is renamed away first, so a half-deleted one never lists."""
    removed = []
    for old in list_checkpoints(directory)[:-keep]:
        doomed = old.with_name(f".del-{old.name}")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(old)
    return removed


def clean_stale_temporaries(run_dir: Path) -> None:
    """Remove what interrupted writes left (temporary and half-deleted checkpoints, renders, atomic files)."""
    for directory in (run_dir, run_dir / "checkpoints"):
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            if not STALE.match(path.name):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob("step-*") if (p / COMPLETE_MARK).is_file()]
    return sorted(found, key=lambda p: p.name)


def checkpoint_problem(checkpoint: Path) -> Optional[str]:
    """None when every file complete.json lists is there with its size and checksum; else what is wrong."""
    try:
        mark = json.loads((checkpoint / COMPLETE_MARK).read_text(encoding="utf-8"))
        files = mark.get("files")
    except (OSError, ValueError, AttributeError):
        return f"{COMPLETE_MARK} is unreadable"
    if files is None:  # written before checksums were recorded: the files must at least be there
        needed = ["trainer_state.pt"]
        if not any((checkpoint / d).is_dir() for d in ("sharded", "deepspeed")):
            needed.append("model/weights.safetensors")
        missing = [n for n in needed if not (checkpoint / n).is_file()]
        return f"{missing[0]} is missing" if missing else None
    if not isinstance(files, dict):
        return f"{COMPLETE_MARK} is unreadable"
    for name, expected in files.items():
        path = checkpoint / name
        try:
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != expected["size"]:
                return f"{name} is truncated or changed ({path.stat().st_size:,} of {expected['size']:,} bytes)"
            if file_sha256(path) != expected["sha256"]:
                return f"{name} does not match its checksum (corrupted)"
        except (OSError, TypeError, KeyError) as err:
            return f"{name} cannot be checked ({err})"
    return None


def find_resume_point(run_dir: Path, explicit: Optional[str]) -> Path:
    """The checkpoint to resume from: an explicit path, or the newest intact one in the run's checkpoints/.

    A damaged newest checkpoint (missing, truncated or corrupted file) is passed over with a notice.
    """
    if explicit:
        path = Path(explicit)
        if not (path / COMPLETE_MARK).is_file():
            raise SftError(f"--resume {path}: not a complete sft checkpoint (no {COMPLETE_MARK})")
        problem = checkpoint_problem(path)
        if problem:
            raise SftError(f"--resume {path}: {problem} — resume from another checkpoint (or --resume alone)")
        return path
    found = list_checkpoints(run_dir / "checkpoints")
    if not found:
        raise SftError(f"--resume: no checkpoint in {run_dir / 'checkpoints'} — start without --resume")
    damaged = []
    for candidate in reversed(found):
        problem = checkpoint_problem(candidate)
        if problem is None:
            if damaged:
                log.warning(
                    "checkpoint %s is damaged (%s): resuming from %s", damaged[0][0], damaged[0][1], candidate.name
                )
            return candidate
        damaged.append((candidate.name, problem))
    name, problem = damaged[0]
    raise SftError(
        f"--resume: no intact checkpoint in {run_dir / 'checkpoints'} ({name}: {problem}) — start over with --overwrite"
    )


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
