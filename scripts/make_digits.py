"""Write scikit-learn's bundled digits (8x8 grayscale, 10 classes) as an image-folder dataset.

A deterministic stratified 80/20 split: data/digits/{train,test}/<digit>/<index>.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def main(root: Path) -> None:
    digits = load_digits()
    indices = np.arange(len(digits.target))
    train, test = train_test_split(indices, test_size=0.2, random_state=0, stratify=digits.target)
    for split, chosen in (("train", train), ("test", test)):
        for index in chosen:
            folder = root / split / str(digits.target[index])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[index] * (255.0 / 16.0)).round().astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"{index:04d}.png")
    print(f"{len(train)} train / {len(test)} test images -> {root}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data/digits"))
