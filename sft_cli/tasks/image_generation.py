"""Image generation with diffusers: denoising diffusion, unconditional (pretraining), class- or text-conditional
(fine-tuning), in pixel space or in a Stable Diffusion-style pipeline's latent space.

- `sft pretrain`: the UNet learns to denoise the training images; any labels are ignored.
- `sft finetune` with labels: the UNet gains a class embedding whose rows start at zero, so step 0 is exactly the
  pretrained model; its last row is the null class that `loss.cond_dropout` trains and classifier-free guidance
  (`eval.guidance_scale`) samples against. With `data.caption_field`: a cross-attention UNet conditioned on a frozen
  text encoder ("" is the null caption). Without either: unconditional fine-tuning.
- `loss.lm: λ` adds λ x the unconditional denoising loss on `data.unlabeled` images (the loss mix).

model/ holds the UNet (config.json + weights), the training noise schedule (scheduler_config.json) and
sft_diffusion.json (mode, class names, sampler); `sft export` writes a diffusers pipeline directory.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sft_cli.data.tables import drop_null_rows, require_columns
from sft_cli.errors import SftError
from sft_cli.model import backbone as bb
from sft_cli.tasks.base import Batch, LossTerms, Task
from sft_cli.tasks.image_classification import ImageClassificationTask
from sft_cli.tasks.image_quality import image_quality, load_feature_model

META_FILE = "sft_diffusion.json"
PIPELINE_FILE = Path(__file__).with_name("diffusion_pipeline.py")
TRAIN_TIMESTEPS = 1000
GRID_COLUMNS = 8
NULL_CAPTION = ""
CLASS_EMBEDDING_LR_SCALE = 30.0  # x optim.lr for the new class embedding (measured on the digits demo)
LATENT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the UNet's attention, as diffusers' LoRA scripts


def _block_types(levels: int, conditional: bool) -> dict[str, list[str]]:
    """Down/up block types for `levels` resolutions: plain convolution at the top, attention below."""
    attention_down = "CrossAttnDownBlock2D" if conditional else "AttnDownBlock2D"
    attention_up = "CrossAttnUpBlock2D" if conditional else "AttnUpBlock2D"
    down = ["DownBlock2D"] + [attention_down] * (levels - 1)
    return {"down_block_types": down, "up_block_types": [attention_up] * (levels - 1) + ["UpBlock2D"]}


def unet_from_scratch(arch: str, overrides: dict[str, Any], size: int, channels: int, text_dim: int = 0) -> nn.Module:
    """A fresh UNet2DModel (`unet2d`) or UNet2DConditionModel (`unet2d-condition`), small unless the recipe says."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    conditional = arch == "unet2d-condition"
    config: dict[str, Any] = {
        "sample_size": size,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": [64, 128, 128],
        "layers_per_block": 1,
        # the time (and class) embedding scales and shifts each block's normalized features, as ADM's AdaGN:
        # class conditioning took hold within 500 fine-tuning steps this way and not with a bias alone (measured)
        "resnet_time_scale_shift": "scale_shift",
    }
    if conditional:
        config.update(cross_attention_dim=text_dim, attention_head_dim=8)
    config.update(overrides)
    levels = len(config["block_out_channels"])
    for key, value in _block_types(levels, conditional).items():
        config.setdefault(key, value)
    cls = UNet2DConditionModel if conditional else UNet2DModel
    try:
        return cls(**config)
    except (TypeError, ValueError) as err:
        raise SftError(f"backbone.config: {' '.join(str(err).split())[:200]}") from None


def load_unet(location: str) -> tuple[nn.Module, Path, Optional[Path]]:
    """A pretrained UNet from a diffusers model directory, a pipeline directory (its unet/), or a hub id;
    returns it, the local directory it came from, and that directory again when it is a pipeline (latent)."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    path = Path(location).expanduser()
    if not path.exists() and "/" in location and not location.startswith((".", "/")):
        path = _download(location)
    pipeline = path if (path / "model_index.json").exists() else None
    folder = path / "unet" if pipeline else path
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        raise SftError(
            f"backbone.name: {location} is not a diffusers UNet or pipeline directory (no config.json"
            f"{' in unet/' if pipeline else ''}) — name an sft image-generation run's model/, a diffusers pipeline "
            "directory, or set backbone.from_scratch: true with backbone.arch: unet2d"
        ) from None
    cls = UNet2DConditionModel if config.get("_class_name") == "UNet2DConditionModel" else UNet2DModel
    if config.get("_class_name") not in ("UNet2DModel", "UNet2DConditionModel"):
        raise SftError(f"backbone.name: {folder} holds a {config.get('_class_name')}, not a UNet2DModel")
    extra = config.get("addition_embed_type") or config.get("class_embed_type")
    if extra:
        raise SftError(
            f"backbone.name: {folder} is a UNet with extra conditioning ({extra}: SDXL-style) — sft trains "
            "UNet2DModel and Stable Diffusion 1.x / 2.x-style UNets"
        )
    try:
        return cls.from_pretrained(str(folder)), path.resolve(), pipeline
    except (OSError, ValueError, RuntimeError) as err:
        raise SftError(f"backbone.name: {folder} cannot be loaded ({' '.join(str(err).split())[:200]})") from None


def _download(repo_id: str) -> Path:
    """A hub model's diffusers files (safetensors, no fp16/EMA-only variants, no safety checker)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["model_index.json", "*.json", "*/*.json", "*/*.safetensors", "tokenizer/*"],
                ignore_patterns=["*fp16*", "*non_ema*", "safety_checker/*"],
            )
        )
    except Exception as err:  # offline, unknown repo, gated: the hub says why
        detail = " ".join(str(err).split())[:200]
        raise SftError(
            f"backbone.name: {repo_id} is no local directory and cannot be fetched from the hub ({detail})"
        ) from None


def with_class_embedding(unet: nn.Module, classes: int) -> nn.Module:
    """The same UNet with `classes` + 1 class embeddings (the last: null) that start at zero, so its output is
    unchanged until they train; a UNet that already has that many keeps its own."""
    from diffusers import UNet2DModel

    if getattr(unet.config, "num_class_embeds", None) == classes + 1:
        return unet
    if not isinstance(unet, UNet2DModel):
        raise SftError(
            "data.label_field: class-conditional fine-tuning needs a UNet2DModel backbone (backbone.arch: unet2d)"
        )
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    config.update(num_class_embeds=classes + 1, class_embed_type=None)
    conditioned = UNet2DModel(**config)
    missing, unexpected = conditioned.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("class_embedding.") for k in missing):
        raise SftError("backbone.name: its UNet does not fit a class-conditional copy of itself")
    nn.init.zeros_(conditioned.class_embedding.weight)
    return conditioned


def noise_scheduler(location: Optional[Path], prediction: Optional[str], schedule: Optional[str]) -> Any:
    """The training DDPMScheduler: the backbone's (when it has one), with the recipe's overrides."""
    from diffusers import DDPMScheduler

    config: dict[str, Any] = {"num_train_timesteps": TRAIN_TIMESTEPS, "beta_schedule": "linear"}
    for candidate in [location / "scheduler", location] if location else []:
        if (candidate / "scheduler_config.json").exists():
            config = dict(DDPMScheduler.load_config(str(candidate)))
            break
    if prediction:
        config["prediction_type"] = prediction
    if schedule:
        config["beta_schedule"] = schedule
    config.setdefault("prediction_type", "epsilon")
    return DDPMScheduler.from_config(config)


def sampler(training: Any, name: str) -> Any:
    """The eval / predict / export sampler, from the training schedule (DDIM, DPM-Solver++ or ancestral DDPM)."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    cls = {"ddim": DDIMScheduler, "dpm-solver": DPMSolverMultistepScheduler, "ddpm": DDPMScheduler}[name]
    return cls.from_config(training.config)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] training pixels -> [0, 1]."""
    return (images / 2 + 0.5).clamp(0, 1)


def to_pil(pixels: np.ndarray) -> Any:
    """An H x W x C float image in [0, 1] as a PIL image, quantized as diffusers' numpy_to_pil does."""
    from PIL import Image

    quantized = (pixels * 255).round().astype(np.uint8)
    return Image.fromarray(quantized[..., 0] if quantized.shape[-1] == 1 else quantized)


def save_png(image: Any, path: Path) -> None:
    """Write a PNG whole or not at all (a temporary beside it, then renamed)."""
    partial = path.with_name(f".{path.name}.partial")
    image.save(partial, format="PNG")
    partial.replace(path)


def image_grid(images: np.ndarray, rows: list[list[int]]) -> Any:
    """A PIL grid: one row per list of image indices (N x H x W x C floats in [0, 1])."""
    height, width, channels = images.shape[1:]
    columns = max(len(r) for r in rows)
    canvas = np.ones((len(rows) * (height + 2), columns * (width + 2), channels), dtype=np.float32)
    for y, row in enumerate(rows):
        for x, index in enumerate(row):
            canvas[
                y * (height + 2) + 1 : y * (height + 2) + 1 + height, x * (width + 2) + 1 : x * (width + 2) + 1 + width
            ] = images[index]
    return to_pil(canvas)


@contextmanager
def plain_forward(unet: nn.Module) -> Iterator[None]:
    """The UNet's own forward inside the block, without the mixed-precision autocast Accelerate wraps around it."""
    patched = unet.__dict__.get("forward")
    original = unet.__dict__.get("_original_forward")
    if patched is not None and original is not None:
        unet.forward = original
    try:
        with torch.autocast(device_type=unet.device.type, enabled=False):
            yield
    finally:
        if patched is not None and original is not None:
            unet.forward = patched


def _whole(value: Any) -> bool:
    """A whole number (2, or 2.0 from a CSV column with blanks), not a bool."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and float(value).is_integer()


def slug(value: Any) -> str:
    """A file-name-safe form of a class name or caption."""
    text = re.sub(r"[^A-Za-z0-9]+", "-", str(value)).strip("-")
    return text[:40] or "image"


class ImageGenerationTask(Task):
    """Denoising diffusion on images; eval: deterministic denoising loss, FID / IS / class accuracy, sample grids."""

    main_metric = "eval_loss"
    truncates = False
    eval_at_start = True  # the starting point's loss, FID and samples (for fine-tuning: the pretrained model's)

    def setup(self, model_dir: Optional[str] = None, train: bool = True) -> None:
        data = self.recipe.data
        self.unlabeled = None
        self.features: Any = None
        self.samples: Optional[dict[str, Any]] = None
        if train:
            self.train_set = self._images(data.train, "data.train")
            self.mode = self._mode(self.train_set)
            self._build(self.train_set)
            if self.recipe.loss.lm > 0:
                if not data.unlabeled:
                    raise SftError("loss.lm: the unconditional denoising term needs data.unlabeled (images) — set it")
                if self.mode == "unconditional":
                    raise SftError("loss.lm: unconditional training already denoises every image — use data.train")
                self.unlabeled = self._images(data.unlabeled, "data.unlabeled")
        else:
            self.load_for_inference(model_dir)
        if data.eval:
            self.eval_set = self._images(data.eval, "data.eval")
            self._check_conditions(self.eval_set, "data.eval")
            self.eval_set = self.eval_set.add_column("_index", list(range(len(self.eval_set))))
            if self.recipe.eval.feature_model:
                self.features, self.feature_description = load_feature_model(self.recipe.eval.feature_model)
                self._check_feature_labels()

    # -- data ------------------------------------------------------------------------------------

    def _images(self, location: Any, key: str) -> Any:
        """Rows with a decodable image column (as image classification reads them), one size unless resized."""
        table = ImageClassificationTask._table(self, location, key)  # same folders, files and checks
        field = ImageClassificationTask._image_column(self, table)
        require_columns(table, [field], "data.image_field", f"{key} ({location})")
        self.image_field = field
        caption = self.recipe.data.caption_field
        if caption and caption in table.column_names:
            table = drop_null_rows(table, [caption], key, self.skipped)
        if self.recipe.data.image_size is None and len(table):
            import io

            import datasets
            from PIL import Image

            sizes = set()
            for value in table.cast_column(field, datasets.Image(decode=False))[field]:
                with Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]) as image:
                    sizes.add(image.size)  # the header only
                if len(sizes) > 1:
                    shown = " and ".join(f"{w}x{h}" for w, h in sorted(sizes))
                    raise SftError(
                        f"{key}: images of different sizes ({shown}) — set data.image_size to the side they are "
                        "resized to"
                    )
        return table

    def _mode(self, table: Any) -> str:
        """unconditional (pretraining, or no labels / captions), class, or text."""
        data = self.recipe.data
        if self.command == "pretrain":
            return "unconditional"
        if data.caption_field:
            require_columns(table, [data.caption_field], "data.caption_field", f"data.train ({data.train})")
            return "text"
        return "class" if data.label_field in table.column_names else "unconditional"

    def _check_conditions(self, table: Any, key: str) -> None:
        data = self.recipe.data
        if self.mode == "class":
            require_columns(table, [data.label_field], "data.label_field", f"{key}")
            unknown = sorted({str(v) for v in table[data.label_field]} - set(self.names))
            if unknown:
                raise SftError(
                    f"{key}: class(es) {', '.join(unknown[:5])} have no embedding in this model (it knows "
                    f"{', '.join(self.names[:10])}) — evaluate on the trained classes"
                )
        if self.mode == "text":
            require_columns(table, [data.caption_field], "data.caption_field", key)

    def _check_feature_labels(self) -> None:
        if self.mode == "class" and self.features is not None:
            if not set(self.features.labels()) & set(self.names):
                raise SftError(
                    f"eval.feature_model: its classes ({', '.join(self.features.labels()[:8])}) share none with "
                    f"this model's ({', '.join(self.names[:8])}) — class_accuracy needs a classifier of the same classes"
                )

    def pixels(self, images: list[Any], train: bool) -> torch.Tensor:
        """Images -> N x C x H x W in [-1, 1] (resized to data.image_size; flipped when data.augment says)."""
        mode = "L" if self.channels == 1 else "RGB"
        arrays = []
        for image in images:
            image = image.convert(mode)
            if image.size != (self.size, self.size):
                image = image.resize((self.size, self.size), resample=3)
            arrays.append(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
        batch = torch.from_numpy(np.stack(arrays))
        batch = batch[:, None] if batch.ndim == 3 else batch.permute(0, 3, 1, 2)
        if train and self.recipe.data.augment.horizontal_flip:
            flip = torch.rand(len(images)) < 0.5
            batch[flip] = batch[flip].flip(-1)
        return batch.contiguous()

    # -- the model -------------------------------------------------------------------------------

    def _build(self, table: Any) -> None:
        spec, data = self.recipe.backbone, self.recipe.data
        self.names: list[str] = []
        if self.mode == "class":
            from sft_cli.tasks.classification import label_names

            self.names = label_names(table[data.label_field])
        self.pipeline_dir: Optional[Path] = None
        location: Optional[Path] = None
        if spec.from_scratch:
            arch = spec.arch or ("unet2d-condition" if self.mode == "text" else "unet2d")
            if arch not in ("unet2d", "unet2d-condition"):
                raise SftError(f"backbone.arch: '{arch}' — image generation builds unet2d or unet2d-condition")
            self.channels = 1 if self._grey(table) else 3
            self.size = data.image_size or self._first_size(table)
            if arch == "unet2d-condition":
                self._load_text_encoder(None)
            unet = unet_from_scratch(arch, spec.config, self.size, self.channels, self._text_width())
        else:
            unet, location, self.pipeline_dir = load_unet(spec.name)
            if self.pipeline_dir is not None and (self.pipeline_dir / "vae").is_dir():
                self._load_latent_components(self.pipeline_dir)
            elif type(unet).__name__ == "UNet2DConditionModel":
                self._load_text_encoder(location)
            self.channels = 3 if self.latent else unet.config.in_channels
            sample = unet.config.sample_size
            self.size = data.image_size or (sample * self.vae_scale if self.latent else sample)
        side = self.size // self.vae_scale if self.latent else self.size
        if unet.config.sample_size != side:  # samples are drawn at the trained size
            unet.register_to_config(sample_size=side)
        self.new_class_embedding = False
        if self.mode == "class":
            self._check_backbone_classes(location)
            self.new_class_embedding = getattr(unet.config, "num_class_embeds", None) is None
            unet = with_class_embedding(unet, len(self.names))
        if self.mode == "text" and self.text_encoder is None:
            raise SftError(
                "data.caption_field: text-conditional fine-tuning needs a cross-attention UNet — pretrain with "
                "backbone.arch: unet2d-condition (or name a Stable Diffusion-style pipeline directory)"
            )
        self.noise = noise_scheduler(location, self.recipe.loss.prediction, self.recipe.loss.noise_schedule)
        self.model = self._freeze(unet)

    def _check_backbone_classes(self, location: Optional[Path]) -> None:
        """A class-conditional backbone (an earlier fine-tune) continues only with the same classes, in order."""
        meta = location / META_FILE if location is not None else None
        if meta is None or not meta.exists():
            return
        known = json.loads(meta.read_text()).get("labels") or []
        if known and known != self.names:
            raise SftError(
                f"data.label_field: the backbone was fine-tuned on the classes {', '.join(known[:10])} and this data "
                f"has {', '.join(self.names[:10])} — fine-tune its unconditional pretraining instead, or use the "
                "same classes"
            )

    latent = False
    vae: Any = None
    vae_scale = 1
    text_encoder: Any = None
    tokenizer: Any = None
    text_max_length = 32

    def _load_text_encoder(self, location: Optional[Path]) -> None:
        """The frozen text encoder: the model's own (text_encoder/), else backbone.text_encoder (MiniLM offline)."""
        from transformers import AutoModel, AutoTokenizer

        if location is not None and (location / "text_encoder").is_dir():
            source = str(location / "text_encoder")
        else:
            name = self.recipe.backbone.text_encoder
            source = str(bb.embedded_aliases().get(name, name))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.text_encoder = AutoModel.from_pretrained(source).eval().requires_grad_(False)
        except (OSError, ValueError) as err:
            raise SftError(
                f"backbone.text_encoder: {source} cannot be loaded ({' '.join(str(err).split())[:160]})"
            ) from None
        self.text_max_length = min(self.recipe.data.max_length, 77)
        if location is not None and (location / META_FILE).exists():
            self.text_max_length = json.loads((location / META_FILE).read_text()).get("text_max_length", 32)

    def _text_width(self) -> int:
        return int(self.text_encoder.config.hidden_size) if self.text_encoder is not None else 0

    def _load_latent_components(self, pipeline: Path) -> None:
        """A Stable Diffusion-style pipeline: frozen VAE (latents) and text encoder + tokenizer."""
        from diffusers import AutoencoderKL
        from transformers import AutoModel, AutoTokenizer

        self.latent = True
        self.vae = AutoencoderKL.from_pretrained(str(pipeline / "vae")).eval().requires_grad_(False)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.tokenizer = AutoTokenizer.from_pretrained(str(pipeline / "tokenizer"))
        self.text_encoder = AutoModel.from_pretrained(str(pipeline / "text_encoder")).eval().requires_grad_(False)
        self.text_max_length = self.tokenizer.model_max_length if self.tokenizer.model_max_length < 1000 else 77

    def _freeze(self, unet: nn.Module) -> nn.Module:
        """The recipe's freeze policy; LoRA goes on the UNet's attention projections (diffusers' LoRA scripts)."""
        policy = self.recipe.freeze
        if policy.policy != "lora":
            return bb.apply_freeze(unet, policy)
        from peft import LoraConfig, get_peft_model

        lora = policy.lora
        targets = lora.target_modules or LATENT_LORA_TARGETS
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            modules_to_save=["class_embedding"] if self.mode == "class" else None,  # new: trains whole, saved
        )
        try:
            model = get_peft_model(unet, config)
        except ValueError as err:
            raise SftError(f"freeze.lora.target_modules: {' '.join(str(err).split())[:200]}") from None
        return model

    def _grey(self, table: Any) -> bool:
        sample = [table[i][self.image_field] for i in range(min(32, len(table)))]
        return all(im.mode in ("L", "1", "I", "F", "I;16") for im in sample)

    def _first_size(self, table: Any) -> int:
        width, height = table[0][self.image_field].size
        if width != height:
            raise SftError(f"data.image_size: the images are {width}x{height}, not square — set data.image_size")
        return width

    def render(self, row: dict) -> Optional[str]:
        """`sft plan`: the image as the model sees it, and what it is conditioned on."""
        image = row[self.image_field]
        seen = (
            f"{image.size[0]}x{image.size[1]} {image.mode} image -> {self.size}x{self.size}, {self.channels} channel(s)"
        )
        if self.mode == "class":
            return f"{seen}; class {row[self.recipe.data.label_field]}"
        if self.mode == "text":
            return f"{seen}; caption: {row[self.recipe.data.caption_field]}"
        return f"{seen}; unconditional"

    def plan_statistics(self) -> dict[str, Any]:
        if self.mode == "class":
            from collections import Counter

            return {
                "mode": self.mode,
                "label_counts": dict(Counter(str(v) for v in self.train_set[self.recipe.data.label_field])),
            }
        return {"mode": self.mode}

    # -- training --------------------------------------------------------------------------------

    def collate(self, rows: list[dict], train: bool) -> Batch:
        data = self.recipe.data
        batch: Batch = {"pixel_values": self.pixels([r[self.image_field] for r in rows], train)}
        drop = (
            torch.rand(len(rows)) < self.recipe.loss.cond_dropout if train else torch.zeros(len(rows), dtype=torch.bool)
        )
        if self.mode == "class":
            labels = torch.tensor([self.names.index(str(r[data.label_field])) for r in rows])
            batch["class_labels"] = torch.where(drop, len(self.names), labels)
        if self.mode == "text":
            captions = [NULL_CAPTION if d else str(r[data.caption_field] or "") for r, d in zip(rows, drop.tolist())]
            batch.update(self._tokens(captions))
        if not train:  # fixed noise and timesteps per eval image: the eval loss is deterministic
            noise, steps = [], []
            for row in rows:
                generator = torch.Generator().manual_seed(self.recipe.engine.seed * 100_003 + int(row["_index"]))
                steps.append(int(torch.randint(0, self.noise.config.num_train_timesteps, (1,), generator=generator)))
                noise.append(torch.randn(self._latent_shape(), generator=generator))
            batch["noise"], batch["timesteps"] = torch.stack(noise), torch.tensor(steps)
        if train and self.unlabeled is not None:
            picks = torch.randint(0, len(self.unlabeled), (len(rows),)).tolist()
            batch["aux_pixel_values"] = self.pixels([self.unlabeled[i][self.image_field] for i in picks], train)
        return batch

    def _latent_shape(self) -> tuple[int, ...]:
        if self.latent:
            side = self.size // self.vae_scale
            return (self.vae.config.latent_channels, side, side)
        return (self.channels, self.size, self.size)

    def _tokens(self, captions: list[str]) -> Batch:
        tokens = self.tokenizer(
            captions, padding="max_length", max_length=self.text_max_length, truncation=True, return_tensors="pt"
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    def counts(self, batch: Batch) -> dict[str, torch.Tensor]:
        counts = {"sup": torch.tensor(batch["pixel_values"].shape[0])}
        if "aux_pixel_values" in batch:
            counts["lm"] = torch.tensor(batch["aux_pixel_values"].shape[0])
        return counts

    def lr_scales(self) -> dict[str, float]:
        """The class embedding starts at zero: at the UNet's LR it stays too small to steer it in a short fine-tune."""
        return (
            {"class_embedding": CLASS_EMBEDDING_LR_SCALE} if self.mode == "class" and self.new_class_embedding else {}
        )

    def loss_weights(self) -> dict[str, float]:
        return {"sup": 1.0} if self.mode == "unconditional" else {}

    def tokens(self, batch: Batch) -> int:
        return int(batch["pixel_values"].shape[0])  # throughput in images

    def _condition(self, batch: Batch, device: torch.device, null: bool = False) -> dict[str, torch.Tensor]:
        """The UNet's conditioning inputs for a batch (or the null condition)."""
        size = batch["pixel_values"].shape[0] if not null else batch["aux_pixel_values"].shape[0]
        if self.mode == "class":
            labels = torch.full((size,), len(self.names), device=device) if null else batch["class_labels"]
            return {"class_labels": labels}
        if self.text_encoder is not None:  # a text UNet: its captions, or "" (unconditional training, loss.lm)
            tokens = batch if self.mode == "text" and not null else self._tokens([NULL_CAPTION] * size)
            encoder = self.text_encoder.to(device)
            mask = tokens["attention_mask"].to(device)
            if self.latent and not getattr(encoder.config, "use_attention_mask", False):
                mask = None  # as StableDiffusionPipeline.encode_prompt: CLIP attends to its padding
            with torch.no_grad():
                states = encoder(input_ids=tokens["input_ids"].to(device), attention_mask=mask).last_hidden_state
            return {"encoder_hidden_states": states}
        return {}

    def _encode(self, pixels: torch.Tensor, fixed: bool = False) -> torch.Tensor:
        """Pixels -> what the UNet denoises: themselves, or scaled VAE latents (their mean when `fixed`: eval)."""
        if not self.latent:
            return pixels
        vae = self.vae.to(pixels.device)
        with torch.no_grad():
            posterior = vae.encode(pixels.to(vae.dtype)).latent_dist
            return (posterior.mode() if fixed else posterior.sample()) * vae.config.scaling_factor

    def denoising_losses(
        self,
        model: nn.Module,
        clean: torch.Tensor,
        condition: dict[str, torch.Tensor],
        noise: Any = None,
        steps: Any = None,
    ) -> torch.Tensor:
        """The (min-SNR weighted) denoising loss of each image: noise at a timestep, predict noise or velocity."""
        from diffusers.training_utils import compute_snr

        x0 = self._encode(clean, fixed=noise is not None)
        noise = torch.randn_like(x0) if noise is None else noise.to(x0)
        if steps is None:
            steps = torch.randint(0, self.noise.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        noisy = self.noise.add_noise(x0, noise, steps)
        prediction = model(noisy, steps, **condition).sample
        if self.noise.config.prediction_type == "v_prediction":
            target = self.noise.get_velocity(x0, noise, steps)
        else:
            target = noise
        per_image = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        gamma = self.recipe.loss.snr_gamma
        if gamma:
            snr = compute_snr(self.noise, steps)
            weight = torch.clamp(snr, max=gamma)
            weight = weight / (snr + 1) if self.noise.config.prediction_type == "v_prediction" else weight / snr
            per_image = per_image * weight
        return per_image

    def loss_terms(self, model: nn.Module, batch: Batch) -> LossTerms:
        device = batch["pixel_values"].device
        losses = self.denoising_losses(
            model, batch["pixel_values"], self._condition(batch, device), batch.get("noise"), batch.get("timesteps")
        )
        terms = {"sup": (losses.sum(), torch.tensor(losses.shape[0], device=device))}
        if "aux_pixel_values" in batch:
            aux = self.denoising_losses(model, batch["aux_pixel_values"], self._condition(batch, device, null=True))
            terms["lm"] = (aux.sum(), torch.tensor(aux.shape[0], device=device))
        return terms

    # -- sampling --------------------------------------------------------------------------------

    def pipeline(self, model: nn.Module, sampler_name: Optional[str] = None) -> Any:
        """A diffusers pipeline around the (unwrapped) UNet and the eval sampler: the exported pipeline's class."""
        from diffusers import DDPMPipeline

        from sft_cli.tasks.diffusion_pipeline import SftClassConditionalPipeline, SftTextToImagePipeline

        unet = bb.unwrap(model)
        if hasattr(unet, "get_base_model"):  # LoRA: the UNet with its adapters injected
            unet = unet.get_base_model()
        scheduler = sampler(self.noise, sampler_name or self.recipe.eval.sampler)
        if self.latent:
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline(
                vae=self.vae.to(unet.device),
                text_encoder=self.text_encoder.to(unet.device),
                tokenizer=self.tokenizer,
                unet=unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        elif self.mode == "class":
            pipe = SftClassConditionalPipeline(unet=unet, scheduler=scheduler, labels=self.names)
        elif self.text_encoder is not None:
            pipe = SftTextToImagePipeline(
                unet=unet,
                scheduler=scheduler,
                text_encoder=self.text_encoder.to(unet.device),
                tokenizer=self.tokenizer,
                max_length=self.text_max_length,
            )
        else:
            pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample(
        self, model: nn.Module, conditions: list[Any], seed: int, steps: int, guidance: float, chunk: int
    ) -> torch.Tensor:
        """Images in [0, 1] (N x C x H x W, CPU) for each condition (class name, caption or None), from one seeded
        generator drawn in chunks — the same images for the same seed every time."""
        pipe = self.pipeline(model)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        out = []
        with plain_forward(bb.unwrap(model)):  # the weights' own dtype, no autocast: what the export computes
            for start in range(0, len(conditions), chunk):
                part = conditions[start : start + chunk]
                out.append(self._call(pipe, part, generator, steps, guidance))
        return torch.cat(out)

    def _call(self, pipe: Any, conditions: list[Any], generator: Any, steps: int, guidance: float) -> torch.Tensor:
        common = {"generator": generator, "num_inference_steps": steps, "output_type": "pt"}
        if self.latent:
            images = pipe(prompt=[c or "" for c in conditions], guidance_scale=guidance, **common).images
        elif self.mode == "class":
            images = pipe(class_labels=conditions, guidance_scale=guidance, **common).images
        elif self.text_encoder is not None:
            images = pipe(prompt=[c or "" for c in conditions], guidance_scale=guidance, **common).images
        else:
            common["output_type"] = "np"
            array = pipe(batch_size=len(conditions), **common).images
            return torch.from_numpy(array).permute(0, 3, 1, 2).float()
        return images.float().cpu()

    def _eval_conditions(self) -> tuple[list[Any], list[list[int]]]:
        """What each eval sample is conditioned on, and the grid rows (one per class / caption)."""
        n = self.recipe.eval.num_samples
        if self.mode == "class":
            conditions = [self.names[i % len(self.names)] for i in range(n)]
            rows = [[i for i in range(n) if i % len(self.names) == c][:GRID_COLUMNS] for c in range(len(self.names))]
            return conditions, [r for r in rows if r]
        if self.mode == "text":
            captions = [str(c) for c in self.eval_set[self.recipe.data.caption_field]]
            conditions = [captions[i % len(captions)] for i in range(n)]
            firsts: dict[str, list[int]] = {}
            for index, caption in enumerate(conditions):
                firsts.setdefault(caption, []).append(index)
            return conditions, [r[:GRID_COLUMNS] for r in list(firsts.values())[:16]]
        conditions = [None] * n
        return conditions, [list(range(i, min(i + GRID_COLUMNS, n))) for i in range(0, min(n, 64), GRID_COLUMNS)]

    # -- evaluation ------------------------------------------------------------------------------

    def evaluate(self, model: nn.Module, batches: Iterable[Batch], gather: Any, final: bool = True) -> dict[str, Any]:
        losses, reals = [], []
        with torch.no_grad():
            for batch in batches:
                condition = self._condition(batch, batch["pixel_values"].device)
                per_image = self.denoising_losses(
                    model, batch["pixel_values"], condition, batch["noise"], batch["timesteps"]
                )
                losses.extend(per_image.float().cpu().tolist())
                reals.extend(to_unit(batch["pixel_values"]).float().cpu().numpy())
        losses, reals = gather(losses), gather(reals)
        metrics: dict[str, Any] = {"loss": float(np.mean(losses)), "num_examples": len(losses)}
        settings = self.recipe.eval
        conditions, rows = self._eval_conditions()
        fake = self.sample(
            model,
            conditions,
            self.recipe.engine.seed,
            settings.num_inference_steps,
            self._guidance(settings.guidance_scale),
            settings.batch_size,
        )
        metrics["num_samples"] = len(conditions)
        if self.features is not None or self.recipe.eval.feature_model:
            real = torch.from_numpy(np.stack(reals))
            wanted = conditions if self.mode == "class" else None
            metrics.update(image_quality(self.features, self.feature_description, fake, real, wanted))
        self.samples = {"images": fake.permute(0, 2, 3, 1).numpy(), "rows": rows}
        return metrics

    def _guidance(self, scale: float) -> float:
        return scale if self.mode != "unconditional" else 1.0

    def write_eval_artifacts(self, run_dir: Path, step: int) -> None:
        """samples/step-N.png: the grid from this evaluation (same seeds every time, so progress shows)."""
        if self.samples is None:
            return
        from sft_cli.rundir import manifest

        folder = run_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        save_png(image_grid(self.samples["images"], self.samples["rows"]), folder / f"step-{step}.png")
        manifest.record(run_dir, folder)

    def report(self, metrics: dict[str, Any], directory: Path) -> None:
        """`sft eval`: samples.png beside eval.json."""
        if self.samples is not None:
            save_png(image_grid(self.samples["images"], self.samples["rows"]), directory / "samples.png")

    # -- saving, loading, predict, export --------------------------------------------------------

    def _meta(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "labels": self.names,
            "image_size": self.size,
            "channels": self.channels,
            "latent_pipeline": str(Path(self.pipeline_dir).resolve()) if self.latent else None,
            "text_max_length": self.text_max_length,
            "sampler": self.recipe.eval.sampler,
            "num_inference_steps": self.recipe.eval.num_inference_steps,
            "guidance_scale": self._guidance(self.recipe.eval.guidance_scale),
        }

    def save(self, model: nn.Module, directory: Path, state_dict: Optional[dict] = None) -> None:
        network = model
        if hasattr(network, "merge_and_unload") and state_dict is not None:
            raise SftError("freeze.policy: lora on an image-generation UNet is not saved under FSDP — use ddp")
        if hasattr(network, "merge_and_unload"):  # LoRA: the adapter beside merged weights sft and diffusers load
            network.save_pretrained(str(directory / "unet_lora"))
            network = copy.deepcopy(network).merge_and_unload()
        if state_dict is not None:
            network = type(network).from_config(network.config)
            network.load_state_dict(state_dict)
        network.save_pretrained(str(directory), safe_serialization=True)
        self.noise.save_pretrained(str(directory))
        if self.text_encoder is not None and not self.latent:
            self.text_encoder.save_pretrained(str(directory / "text_encoder"))
            self.tokenizer.save_pretrained(str(directory / "text_encoder"))
        (directory / META_FILE).write_text(json.dumps(self._meta(), indent=2))

    def load_for_inference(self, model_dir: str) -> None:
        from diffusers import DDPMScheduler

        path = Path(model_dir)
        try:
            meta = json.loads((path / META_FILE).read_text())
        except (OSError, ValueError):
            raise SftError(
                f"--model: {path} has no readable {META_FILE} — it is not an sft image-generation model"
            ) from None
        self.mode, self.names = meta["mode"], list(meta["labels"])
        self.size, self.channels = meta["image_size"], meta["channels"]
        self.text_max_length = meta.get("text_max_length", 32)
        unet, _, _ = load_unet(str(path))
        self.pipeline_dir = Path(meta["latent_pipeline"]) if meta.get("latent_pipeline") else None
        if self.pipeline_dir is not None:
            self._load_latent_components(self.pipeline_dir)
        elif (path / "text_encoder").is_dir():
            self._load_text_encoder(path)
        self.noise = DDPMScheduler.from_pretrained(str(path))
        self.model = unet.eval()
        self.image_field = self.recipe.data.image_field

    def prediction_table(self, location: str) -> Any:
        """Rows naming what to draw (`label` or `caption`, optional `seed` and `num_images`); every row gets a seed
        (predict.seed, else engine.seed, plus its row number) so the output says how to draw it again."""
        from sft_cli.data.tables import load_table

        table = load_table(location, "--input", self.data_cache)
        base = self.recipe.predict.seed if self.recipe.predict.seed is not None else self.recipe.engine.seed

        for index, seed in enumerate(table["seed"] if "seed" in table.column_names else []):
            if seed is not None and not _whole(seed):
                raise SftError(f"--input: row {index + 1}: seed must be a whole number; got {seed!r}")

        def fill(row: dict, index: int) -> dict:
            return {"seed": int(row["seed"]) if row.get("seed") is not None else base + index}

        return table.map(fill, with_indices=True, load_from_cache_file=False)

    def check_input(self, columns: list[str]) -> None:
        data = self.recipe.data
        if self.mode == "class" and data.label_field not in columns:
            raise SftError(f"data.label_field='{data.label_field}': no such column in --input ({', '.join(columns)})")
        if self.mode == "text" and (data.caption_field or "caption") not in columns:
            raise SftError(f"data.caption_field: no '{data.caption_field or 'caption'}' column in --input")

    def row_problems(self, rows: list[dict], first: int) -> list[Optional[str]]:
        problems: list[Optional[str]] = []
        for offset, row in enumerate(rows):
            if self.mode == "class" and str(row.get(self.recipe.data.label_field)) not in self.names:
                raise SftError(
                    f"--input: row {first + offset} asks for class '{row.get(self.recipe.data.label_field)}', which "
                    f"this model has no embedding for (it knows {', '.join(self.names[:10])})"
                )
            count = row.get("num_images", 1)
            if count is not None and (not _whole(count) or count < 1):
                raise SftError(f"--input: row {first + offset}: num_images must be a whole number >= 1; got {count!r}")
            problems.append(None)
        return problems

    def predict(self, model: nn.Module, rows: list[dict], settings: Any) -> list[dict[str, Any]]:
        output = self.prediction_output or Path("predictions.jsonl")
        folder = output.with_name(output.name.removesuffix(".jsonl") + ".images")  # beside the index
        folder.mkdir(parents=True, exist_ok=True)
        steps = settings.num_inference_steps or self.recipe.eval.num_inference_steps
        guidance = self._guidance(
            settings.guidance_scale if settings.guidance_scale is not None else self.recipe.eval.guidance_scale
        )
        out = []
        for row in rows:
            condition = self._row_condition(row)
            count = int(row.get("num_images") or settings.num_images)
            images = self.sample(model, [condition] * count, int(row["seed"]), steps, guidance, max(count, 1))
            paths = []
            for k, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
                name = f"{slug(condition) if condition is not None else 'image'}-seed{row['seed']}-{k}.png"
                to_pil(image).save(folder / name)
                paths.append(str(Path(folder.name) / name))
            out.append({"path": paths[0] if count == 1 else paths, "seed": int(row["seed"])})
        return out

    def _row_condition(self, row: dict) -> Any:
        if self.mode == "class":
            return str(row[self.recipe.data.label_field])
        if self.mode == "text":
            return str(row.get(self.recipe.data.caption_field or "caption") or "")
        return None

    def export(self, model: nn.Module, directory: Path) -> bool:
        """A diffusers pipeline directory: DDPMPipeline (unconditional), StableDiffusionPipeline (latent), or sft's
        class- / text-conditional pipeline (pipeline.py beside it: `trust_remote_code=True`)."""
        dtype = next(bb.unwrap(model).parameters()).dtype  # `sft export --dtype`: every component alike
        for part in (self.vae, self.text_encoder):
            if part is not None:
                part.to(dtype)
        pipe = self.pipeline(model, self.recipe.eval.sampler)
        pipe.save_pretrained(str(directory), safe_serialization=True)
        if not self.latent and self.mode == "class" or (self.text_encoder is not None and not self.latent):
            shutil.copy2(PIPELINE_FILE, directory / "pipeline.py")
            index = json.loads((directory / "model_index.json").read_text())
            index["_class_name"] = ["pipeline", type(pipe).__name__]
            (directory / "model_index.json").write_text(json.dumps(index, indent=2))
        (directory / META_FILE).write_text(json.dumps(self._meta(), indent=2))
        return True
