"""Synthesize a small speech-recognition dataset with espeak-ng: spoken commands, several voices, speeds, pitches.

The sentences come from a small grammar written here ("put the green cup under the window"); train and test
share words but not sentences, and the test voices are voices training never hears. Deterministic for one
espeak-ng version. Writes <root>/{train,test}/NNNN.flac (16 kHz mono) and <root>/{train,test}.jsonl rows
{"audio": "train/0001.flac", "text": ..., "voice": ...}.

    python scripts/make_speech.py data/speech            # 1,200 train / 200 test (the demo and the bench)
    python scripts/make_speech.py DIR --train 48 --test 16 --rate 22050   # a small fixture at espeak's own rate
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf

VERBS = ["put", "move", "take", "bring", "leave", "place", "drop", "push"]
COLORS = ["red", "green", "blue", "black", "white", "yellow", "brown", "small", "large", "old"]
THINGS = ["cup", "book", "lamp", "chair", "box", "plate", "bottle", "key", "shoe", "phone", "clock", "bag"]
PLACES = ["table", "window", "door", "bed", "shelf", "floor", "sofa", "desk", "wall", "sink"]
RELATIONS = ["on", "under", "near", "behind"]

TRAIN_VOICES = ["en-us+m1", "en-us+f2", "en+m3", "en+f1", "en-gb-scotland+m2", "en-029+f3", "en-us+m7", "en+f4"]
TEST_VOICES = ["en-gb-x-rp+f5", "en-gb-x-gbclan+m5", "en-us+m4"]


def sentences(seed: int) -> list[str]:
    """Every sentence of the grammar, shuffled."""
    every = [
        f"{verb} the {color} {thing} {relation} the {place}"
        for verb, color, thing, relation, place in itertools.product(VERBS, COLORS, THINGS, RELATIONS, PLACES)
    ]
    random.Random(seed).shuffle(every)
    return every


def speak(text: str, voice: str, speed: int, pitch: int, rate: int) -> np.ndarray:
    """espeak-ng's waveform for `text`, mono float32 at `rate` Hz."""
    import soxr

    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
        check=True,
        capture_output=True,
    ).stdout
    audio, native = sf.read(io.BytesIO(wav), dtype="float32")
    return audio if native == rate else soxr.resample(audio, native, rate).astype(np.float32)


def write_split(root: Path, split: str, texts: list[str], voices: list[str], rate: int, seed: int) -> None:
    """Speak each text with a seeded voice, speed and pitch; write FLAC files and the split's jsonl."""
    rng = random.Random(seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    rows = []
    for index, text in enumerate(texts, 1):
        voice, speed, pitch = rng.choice(voices), rng.randint(135, 195), rng.randint(30, 70)
        name = f"{split}/{index:04d}.flac"
        sf.write(root / name, speak(text, voice, speed, pitch, rate), rate, format="FLAC")
        rows.append({"audio": name, "text": text, "voice": f"{voice} -s {speed} -p {pitch}"})
    with open(root / f"{split}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, nargs="?", default=Path("data/speech"))
    parser.add_argument("--train", type=int, default=1200)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--rate", type=int, default=16000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not installed: apt-get install espeak-ng (Debian/Ubuntu)")
    every = sentences(args.seed)
    train, test = every[: args.train], every[args.train : args.train + args.test]
    write_split(args.root, "train", train, TRAIN_VOICES, args.rate, args.seed + 1)
    write_split(args.root, "test", test, TEST_VOICES, args.rate, args.seed + 2)
    print(f"{len(train)} train / {len(test)} test utterances ({args.rate} Hz) -> {args.root}")


if __name__ == "__main__":
    main()
