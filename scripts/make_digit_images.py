"""scikit-learn's bundled digits, upscaled, for the image-generation demo (pretrain on many unlabelled images,
fine-tune class-conditionally on a few labelled ones).

Uses the same deterministic stratified 80/20 split as scripts/make_digits.py; images are upscaled (bicubic) to
--size pixels. Writes under <root>:
- unlabeled/NNNN.png   every training-split image, no labels (pretraining, and the loss mix's data.unlabeled)
- labeled/<digit>/     --per-class labelled training images per digit (the fine-tuning set)
- classifier/<digit>/  every training-split image with its label: only for the evaluator (eval.feature_model),
                       a classifier that scores generated digits; no generator trains on these labels
- test/<digit>/        the held-out split (FID's real images; never trained on)

    python scripts/make_digit_images.py data/digits-gen --size 16 --per-class 10
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def write(root: Path, size: int, per_class: int) -> None:
    """Write the four folders; deterministic."""
    digits = load_digits()
    indices = np.arange(len(digits.target))
    train, test = train_test_split(indices, test_size=0.2, random_state=0, stratify=digits.target)

    def save(index: int, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[index] * (255.0 / 16.0)).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").resize((size, size), resample=Image.BICUBIC).save(folder / f"{index:04d}.png")

    taken: dict[int, int] = {}
    for index in sorted(train):
        label = int(digits.target[index])
        save(index, root / "unlabeled")
        save(index, root / "classifier" / str(label))
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            save(index, root / "labeled" / str(label))
    for index in test:
        save(index, root / "test" / str(int(digits.target[index])))
    print(f"{len(train)} unlabeled / {sum(taken.values())} labeled / {len(test)} test images ({size}px) -> {root}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--per-class", type=int, default=10)
    args = parser.parse_args()
    write(args.root, args.size, args.per_class)
