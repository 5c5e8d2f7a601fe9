"""Is a saved model directory whole? Checked before `sft eval` / `predict` / `chat` / `export` load it, so a
truncated copy or a half-written download is a one-line error naming the file, not a crash inside a loader."""

from __future__ import annotations

from pathlib import Path

from sft_cli.errors import SftError


def check_model_files(directory: Path) -> None:
    """A trained model directory is whole: a readable config and complete weights files (one-line error naming
    the file otherwise — a truncated copy or a half-written download, not a bug)."""
    import json
    import struct

    config = "adapter_config.json" if (directory / "adapter_config.json").exists() else "config.json"
    try:
        json.loads((directory / config).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SftError(f"--model: {directory / config} is missing or unreadable ({err}) — {REPAIR}") from None
    for side in ("sft_generation.json", "sft_preprocess.json"):  # how sft prompts / preprocesses for this model
        try:
            if (directory / side).exists() and not isinstance(json.loads((directory / side).read_text()), dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            raise SftError(f"--model: {directory / side} is unreadable ({err}) — {REPAIR}") from None
    weights = sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin"))
    index = next(iter(sorted(directory.glob("*.safetensors.index.json"))), None)
    if index is not None:
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise SftError(f"--model: {index} is unreadable — {REPAIR}") from None
        missing = sorted(name for name in shards if not (directory / name).is_file())
        if missing:
            raise SftError(f"--model: {directory / missing[0]} is missing — {REPAIR}")
    if not weights:
        raise SftError(f"--model: {directory} has no weights file (model.safetensors) — {REPAIR}")
    for path in weights:
        if path.suffix != ".safetensors":
            continue
        try:
            with open(path, "rb") as f:
                (header_size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_size))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            complete = path.stat().st_size == 8 + header_size + end
        except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError, MemoryError, OverflowError):
            complete = False
        if not complete:
            raise SftError(f"--model: {path} is truncated or corrupted — {REPAIR}")


REPAIR = "copy the model directory again, or retrain (`sft finetune ... --overwrite`)"
