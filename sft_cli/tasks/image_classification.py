"""Image classification: a new head on a transformers vision backbone (ResNet, ViT, ConvNeXt, ...)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoModelForImageClassification

from sft_cli.data.tables import SkipCounter, drop_null_rows, load_table, require_columns
from sft_cli.errors import SftError
from sft_cli.model import backbone as bb
from sft_cli.tasks.base import Batch, Task
from sft_cli.tasks.classification import ClassificationTask, label_names

PREPROCESS_FILE = "sft_preprocess.json"


def check_images(table: Any, field: str, key: str, skip_invalid: bool, skipped: SkipCounter) -> Any:
    """Open every image once before training: an unreadable file is a one-line error naming it (or skipped).

    One corrupt file in ten thousand is normal; finding it at step 9,000 with a PIL traceback is not.
    """
    import io

    import datasets
    from PIL import Image

    raw = table.cast_column(field, datasets.Image(decode=False))
    bad = []
    for row, value in enumerate(raw[field]):
        source = value.get("path") or f"row {row + 1}"
        try:
            with Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]) as image:
                image.draft("RGB", (64, 64))  # JPEG decodes at reduced size: fast, still catches truncation
                image.load()
        except Exception as err:  # PIL raises many types for broken files
            if not skip_invalid:
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise SftError(
                    f"{key}: {source} is not a readable image ({reason}) — fix or remove it, "
                    "or set data.skip_invalid: true to skip unreadable files"
                ) from None
            bad.append(row)
    if not bad:
        return table
    skipped.add(key, "unreadable image", len(bad))
    if len(bad) == len(table):
        raise SftError(f"{key}: none of the {len(table)} images is readable")
    return table.select(sorted(set(range(len(table))) - set(bad)))


def _processor_settings(location: str) -> dict[str, Any]:
    """Size/mean/std from a backbone's image processor, when it ships one."""
    try:
        processor = AutoImageProcessor.from_pretrained(location)
    except Exception:  # no processor config: the recipe decides
        return {}
    size = getattr(processor, "size", None) or {}
    side = size.get("shortest_edge") or size.get("height") if isinstance(size, dict) else size
    return {"image_size": side, "mean": list(processor.image_mean), "std": list(processor.image_std)}


class ImageClassificationTask(ClassificationTask):
    """Images in, one label out; accuracy / macro-F1 / per-class / confusion matrix like text."""

    auto_class = AutoModelForImageClassification

    def setup(self, model_dir: Optional[str] = None, train: bool = True) -> None:
        data, spec = self.recipe.data, self.recipe.backbone
        fields = [data.image_field, data.label_field]
        if train:
            self.train_set = self._table(data.train, "data.train")
            require_columns(self.train_set, fields, "data.image_field/label_field", f"data.train ({data.train})")
            names = label_names(self.train_set[data.label_field])
            if len(names) < 2:
                raise SftError(f"data.train: only one label in {data.train} — classification needs at least two")
            resolved = bb.resolve(spec)
            self.preprocess = self._preprocess_settings(resolved.location if not spec.from_scratch else "")
            if spec.from_scratch and hasattr(resolved.config, "num_channels"):
                resolved.config.num_channels = self.preprocess["channels"]
            self.model = self.new_classifier(resolved, names)
            self.model = bb.apply_freeze(self.model, self.recipe.freeze)
        else:
            self.load_for_inference(model_dir)
            names = self.names
        self.names, self.label2id, self.aux = names, {n: i for i, n in enumerate(names)}, None
        if train:
            self.set_class_weights([self.label2id[str(v)] for v in self.train_set[data.label_field]])
        if data.eval:
            self.eval_set = self._table(data.eval, "data.eval")
            require_columns(self.eval_set, fields, "data.image_field/label_field", f"data.eval ({data.eval})")
            unseen = sorted({str(v) for v in self.eval_set[data.label_field]} - set(self.label2id))
            if unseen:
                raise SftError(
                    f"data.eval: label(s) {', '.join(unseen[:5])} never seen in training (known: {', '.join(names[:10])})"
                )

    def load_for_inference(self, model_dir: str) -> None:
        self.model = bb.load_trained(self.auto_class, model_dir)
        self.preprocess = json.loads((Path(model_dir) / PREPROCESS_FILE).read_text())
        self.names = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.label2id = {n: i for i, n in enumerate(self.names)}

    def prediction_table(self, location: str) -> Any:
        """Image folders (with or without class sub-folders) or rows of paths; every image is checked first."""
        import datasets

        table = self._table(location, "--input", skip_invalid=False)
        field = self._image_column(table)
        return table.cast_column(field, datasets.Image(decode=False))  # paths in the output, decoded per batch

    def check_input(self, columns: list[str]) -> None:
        if self.recipe.data.image_field not in columns:
            raise SftError(
                f"data.image_field='{self.recipe.data.image_field}': no such column in --input ({', '.join(columns)})"
            )

    def row_problems(self, rows: list[dict], first: int) -> list[Optional[str]]:
        return Task.row_problems(self, rows, first)  # images, not text: unreadable files are refused when loaded

    def predict(self, model: torch.nn.Module, rows: list[dict], settings: Any) -> list[dict[str, Any]]:
        import io

        from PIL import Image

        images = []
        for row in rows:
            value = row[self.recipe.data.image_field]
            source = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
            with Image.open(source) as image:
                images.append(image.copy())
        pixels = self.pixels(images, train=False).to(next(model.parameters()).device)
        return self.label_scores(self.logits(model, {"pixel_values": pixels}), settings.top_k)

    def _image_column(self, table: Any) -> str:
        field = self.recipe.data.image_field
        if field not in table.column_names and "image" in table.column_names:
            return "image"
        return field

    def _table(self, location: str, key: str, skip_invalid: Optional[bool] = None) -> Any:
        """Rows with a decodable image column; relative image paths resolve against the data file."""
        import datasets

        table = load_table(location, key, self.data_cache)
        field = self.recipe.data.image_field
        if (
            field == "image"
            and field not in table.column_names
            and "label" in table.column_names
            and len(table.column_names) == 2
        ):
            field = next(c for c in table.column_names if c != "label")
        present = [c for c in (field, self.recipe.data.label_field) if c in table.column_names]
        table = drop_null_rows(table, present, key, self.skipped)
        if field in table.column_names and not isinstance(table.features[field], datasets.Image):
            root = Path(location).parent
            table = table.map(
                lambda row: {field: str(root / row[field]) if not Path(row[field]).is_absolute() else row[field]}
            )
            table = table.cast_column(field, datasets.Image())
        if field in table.column_names:
            skip = self.recipe.data.skip_invalid if skip_invalid is None else skip_invalid
            table = check_images(table, field, key, skip, self.skipped)
        label_feature = table.features.get(self.recipe.data.label_field)
        if isinstance(label_feature, datasets.ClassLabel):  # image folders: keep class names, not indices
            names = label_feature.names
            table = table.map(lambda row: {"label_name": names[row[self.recipe.data.label_field]]})
            table = table.remove_columns(self.recipe.data.label_field).rename_column(
                "label_name", self.recipe.data.label_field
            )
        return table

    def _preprocess_settings(self, location: str) -> dict[str, Any]:
        """Image size, channels, mean, std: the backbone's processor first, then the recipe, then the data."""
        data = self.recipe.data
        found = _processor_settings(location) if location else {}
        sample = [self.train_set[i][data.image_field] for i in range(min(64, len(self.train_set)))]
        gray = all(im.mode in ("L", "1", "I", "F", "I;16") for im in sample)
        channels = len(data.mean) if data.mean else (1 if gray and not found else 3)
        size = found.get("image_size") or data.image_size or max(sample[0].size)
        mean = data.mean or found.get("mean") or [0.5] * channels
        std = data.std or found.get("std") or [0.5] * channels
        if len(mean) != channels or len(std) != channels:
            raise SftError(f"data.mean/data.std: need {channels} values (one per image channel)")
        return {"image_size": int(size), "channels": channels, "mean": list(mean), "std": list(std)}

    def lengths(self, split: str) -> Optional[list[int]]:
        return None

    def pixels(self, images: list[Any], train: bool) -> torch.Tensor:
        """Resize, scale to [0, 1], normalize; random crop/flip only when training."""
        p = self.preprocess
        mode = "L" if p["channels"] == 1 else "RGB"
        size = p["image_size"]
        arrays = [np.asarray(im.convert(mode).resize((size, size)), dtype=np.float32) / 255.0 for im in images]
        batch = torch.from_numpy(np.stack(arrays))
        batch = batch[:, None] if batch.ndim == 3 else batch.permute(0, 3, 1, 2)
        augment = self.recipe.data.augment
        if train and augment.random_crop_padding > 0:
            pad = augment.random_crop_padding
            padded = F.pad(batch, (pad, pad, pad, pad))
            offsets = torch.randint(0, 2 * pad + 1, (len(images), 2))
            batch = torch.stack([padded[i, :, y : y + size, x : x + size] for i, (y, x) in enumerate(offsets.tolist())])
        if train and augment.horizontal_flip:
            flip = torch.rand(len(images)) < 0.5
            batch[flip] = batch[flip].flip(-1)
        mean = torch.tensor(p["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(p["std"]).view(1, -1, 1, 1)
        return (batch - mean) / std

    def collate(self, rows: list[dict], train: bool) -> Batch:
        data = self.recipe.data
        return {
            "pixel_values": self.pixels([r[data.image_field] for r in rows], train),
            "labels": torch.tensor([self.label2id.get(str(r[data.label_field]), -100) for r in rows], dtype=torch.long),
        }

    def logits(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return model(pixel_values=batch["pixel_values"]).logits

    def tokens(self, batch: Batch) -> int:
        return int(batch["labels"].shape[0])  # throughput in images

    def save(self, model: torch.nn.Module, directory: Path, state_dict: Optional[dict] = None) -> None:
        bb.save_pretrained(model, directory, self.recipe.output.merge_lora, state_dict)
        (directory / PREPROCESS_FILE).write_text(json.dumps(self.preprocess, indent=2))
