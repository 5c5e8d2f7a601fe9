"""Audio for speech recognition: read files with libsndfile (soundfile), mono, resampled with soxr.

Where the rows come from: a data file whose audio column holds paths (relative to the data file) or a datasets
`Audio` column, or an audiofolder (a folder of audio files with `metadata.csv` / `metadata.jsonl` naming each
`file_name` and its transcript), or — for `sft predict` — a folder, glob or list of audio files.
"""

from __future__ import annotations

import glob
import io
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sft_cli.data.files import is_data_location
from sft_cli.data.tables import DataCache, load_table
from sft_cli.errors import SftError

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif", ".au")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


class AudioError(Exception):
    """An audio file that cannot be read (missing, corrupt, an unknown format)."""


def read_audio(source: Any, rate: int) -> np.ndarray:
    """Decode a path, a `{"path", "bytes"}` / `{"array", "sampling_rate"}` value into mono float32 at `rate` Hz."""
    import soundfile as sf

    if isinstance(source, dict) and source.get("array") is not None:
        audio, native = np.asarray(source["array"], dtype=np.float32), int(source["sampling_rate"])
    else:
        where = source.get("path") if isinstance(source, dict) else source
        data = source.get("bytes") if isinstance(source, dict) else None
        try:
            audio, native = sf.read(io.BytesIO(data) if data else str(where), dtype="float32", always_2d=True)
        except Exception as err:  # libsndfile raises LibsndfileError, RuntimeError, TypeError, OSError
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise AudioError(detail) from None
        audio = audio.mean(axis=1)
    if audio.ndim > 1:
        audio = audio.mean(axis=-1)
    if native != rate:
        import soxr

        audio = soxr.resample(audio, native, rate)
    return np.ascontiguousarray(audio, dtype=np.float32)


def audio_source(value: Any) -> str:
    """How a message names one audio value (its path)."""
    if isinstance(value, dict):
        return str(value.get("path") or "an in-memory clip")
    return str(value)


def _is_audio_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in AUDIO_EXTENSIONS


def load_audio_rows(location: Any, key: str, audio_field: str, cache: DataCache) -> Any:
    """The rows of one split as a datasets table whose `audio_field` holds absolute paths (or Audio values).

    An audiofolder's `file_name` column becomes `audio_field`; relative paths resolve against the data file.
    """
    import datasets

    path = Path(str(location)).expanduser() if not isinstance(location, (list, tuple)) else None
    if path is not None and path.is_dir():
        metadata = next((path / name for name in METADATA_FILES if (path / name).exists()), None)
        if metadata is None:
            if any(_is_audio_file(p) for p in path.rglob("*")):
                raise SftError(
                    f"{key}: {path} holds audio but no metadata.csv / metadata.jsonl with the transcripts "
                    "(columns file_name and the transcript) — add one, or point at a data file"
                )
            return _with_absolute_paths(load_table(location, key, cache), key, audio_field, path.resolve())
        table = load_table(str(metadata), key, cache)
        if "file_name" not in table.column_names:
            raise SftError(f"{key}: {metadata} has no file_name column (columns: {', '.join(table.column_names)})")
        if audio_field in table.column_names and audio_field != "file_name":
            table = table.remove_columns(audio_field)
        table = table.rename_column("file_name", audio_field) if audio_field != "file_name" else table
        return _with_absolute_paths(table, key, audio_field, path.resolve())
    table = load_table(location, key, cache)
    root = (Path(str(location)).parent if path is not None and path.is_file() else Path(".")).resolve()
    if audio_field in table.column_names and isinstance(table.features[audio_field], datasets.Audio):
        return table.cast_column(audio_field, datasets.Audio(decode=False))
    return _with_absolute_paths(table, key, audio_field, root)


def _with_absolute_paths(table: Any, key: str, audio_field: str, root: Path) -> Any:
    if audio_field not in table.column_names:
        return table  # the task names the missing column
    feature = table.features[audio_field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        return table

    def absolute(rows: dict[str, list]) -> dict[str, list]:
        return {
            audio_field: [
                value if value is None or Path(value).is_absolute() else str(root / value)
                for value in rows[audio_field]
            ]
        }

    return table.map(absolute, batched=True, desc="resolving audio paths")


def audio_files(location: str, key: str) -> Optional[list[str]]:
    """`sft predict --input`: the audio files a folder (recursively), a glob, one audio file or a .txt list (one
    path per line, relative to the list) names, sorted (a list keeps its order); None when the location names
    data files or an audiofolder instead."""
    path = Path(location).expanduser()
    if path.is_file() and path.suffix.lower() == ".txt":  # a list of audio files, one per line
        root = path.parent
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise SftError(f"{key}: {path} lists no audio files")
        return [line if Path(line).is_absolute() else str(root / line) for line in lines]
    if path.is_dir():
        if any((path / name).exists() for name in METADATA_FILES) or is_data_location(location):
            return None
        found = sorted(str(p) for p in path.rglob("*") if _is_audio_file(p))
        if not found:
            raise SftError(f"{key}: {path} holds no audio files ({', '.join(AUDIO_EXTENSIONS)})")
        return found
    if path.suffix.lower() in AUDIO_EXTENSIONS:
        if any(ch in location for ch in "*?["):
            found = sorted(p for p in glob.glob(str(path)) if Path(p).is_file())
            if not found:
                raise SftError(f"{key}: no audio file matches {location}")
            return found
        if not path.is_file():
            raise SftError(f"{key}: {location} not found")
        return [str(path)]
    return None
