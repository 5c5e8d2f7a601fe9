"""Class- and text-conditional sampling for sft's image-generation models, as diffusers pipelines.

This file imports only torch and diffusers: `sft export` copies it into the exported directory as `pipeline.py`,
so `DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)` loads the model without sft, and `sft eval` /
`sft predict` sample through the same code, so the export gives the same image for the same seed. Unconditional
models use diffusers' own `DDPMPipeline`, whose sampling loop these follow step for step.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


def _noise(unet: Any, batch: int, generator: Any, device: torch.device) -> torch.Tensor:
    """The starting noise, drawn as DDPMPipeline draws it."""
    size = unet.config.sample_size
    side = (size, size) if isinstance(size, int) else tuple(size)
    shape = (batch, unet.config.in_channels, *side)
    if device.type == "mps":
        return randn_tensor(shape, generator=generator, dtype=unet.dtype).to(device)
    return randn_tensor(shape, generator=generator, device=device, dtype=unet.dtype)


def _guided(prediction: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance over a [conditional; unconditional] batch (scale 1 is never split)."""
    conditional, unconditional = prediction.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def _denoise(
    pipeline: DiffusionPipeline,
    batch: int,
    condition: dict[str, torch.Tensor],
    guided: Optional[dict[str, torch.Tensor]],
    guidance_scale: float,
    generator: Any,
    num_inference_steps: int,
) -> torch.Tensor:
    """DDPMPipeline's loop with a condition: `condition` conditions the batch; with guidance, `guided` conditions
    the doubled [conditional; unconditional] batch instead."""
    unet, scheduler = pipeline.unet, pipeline.scheduler
    image = _noise(unet, batch, generator, pipeline._execution_device)
    scheduler.set_timesteps(num_inference_steps)
    for t in pipeline.progress_bar(scheduler.timesteps):
        if guided is not None:
            prediction = _guided(unet(torch.cat([image, image]), t, **guided).sample, guidance_scale)
        else:
            prediction = unet(image, t, **condition).sample
        image = scheduler.step(prediction, t, image, generator=generator).prev_sample
    return image


def _output(image: torch.Tensor, pipeline: DiffusionPipeline, output_type: str, return_dict: bool) -> Any:
    image = (image / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        images: Any = image
    else:
        images = image.cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "pil":
            images = pipeline.numpy_to_pil(images)
    return ImagePipelineOutput(images=images) if return_dict else (images,)


class SftClassConditionalPipeline(DiffusionPipeline):
    """A UNet with a class embedding whose last row is the null class (classifier-free guidance)."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: Any, scheduler: Any, labels: Optional[list[str]] = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(labels=list(labels or []))

    def class_index(self, label: Union[str, int, None]) -> int:
        """A class name (or index) as the embedding row; None is the null class."""
        null = self.unet.config.num_class_embeds - 1
        if label is None:
            return null
        names = list(self.config.labels or [])
        if isinstance(label, str) and label in names:
            return names.index(label)
        if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < null:
            return label
        raise ValueError(f"class {label!r} is not one this model was trained on ({', '.join(names[:20])})")

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[Union[str, int, None]],
        guidance_scale: float = 1.0,
        generator: Any = None,
        num_inference_steps: int = 25,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Any:
        device = self._execution_device
        labels = torch.tensor([self.class_index(c) for c in class_labels], device=device)
        null = torch.full_like(labels, self.unet.config.num_class_embeds - 1)
        guided = {"class_labels": torch.cat([labels, null])} if guidance_scale != 1.0 else None
        image = _denoise(
            self, len(labels), {"class_labels": labels}, guided, guidance_scale, generator, num_inference_steps
        )
        return _output(image, self, output_type, return_dict)


class SftTextToImagePipeline(DiffusionPipeline):
    """A cross-attention UNet conditioned on a frozen text encoder's last hidden states ("" is the null caption)."""

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet: Any, scheduler: Any, text_encoder: Any, tokenizer: Any, max_length: int = 32):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)
        self.register_to_config(max_length=max_length)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """The text encoder's states for each prompt, padded to the trained length."""
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=self.config.max_length, truncation=True, return_tensors="pt"
        ).to(self.text_encoder.device)
        states = self.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        return states.last_hidden_state.to(self.unet.dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, list[Optional[str]]],
        guidance_scale: float = 1.0,
        generator: Any = None,
        num_inference_steps: int = 25,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Any:
        prompts = [prompt] if isinstance(prompt, str) else [p or "" for p in prompt]
        device = self._execution_device
        if guidance_scale != 1.0:
            states = self.encode(prompts + [""] * len(prompts)).to(device)
            condition, guided = {}, {"encoder_hidden_states": states}
        else:
            condition, guided = {"encoder_hidden_states": self.encode(prompts).to(device)}, None
        image = _denoise(self, len(prompts), condition, guided, guidance_scale, generator, num_inference_steps)
        return _output(image, self, output_type, return_dict)
