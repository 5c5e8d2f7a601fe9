"""The image-generation row of `make bench`: sft against a plain diffusers training loop shaped like diffusers'
examples/unconditional_image_generation/train_unconditional.py.

Both sides train the same UNet2DModel (random init, saved once to benchmarks/.work/unet-base with its noise
schedule) on the same 1,437 unlabelled 16x16 digits (scripts/make_digit_images.py: scikit-learn's digits,
upscaled), unconditional epsilon prediction, with the same epochs, batch size, AdamW settings, cosine schedule
and warmup, gradient clipping, EMA (diffusers' EMAModel, the same warm-up) and fp32. The diffusers side is that
script's loop: an image folder read through torchvision-free transforms (resize, to [-1, 1]), a shuffled
DataLoader, Accelerate, DDPMScheduler.add_noise, F.mse_loss on the noise, EMA steps after each update. Each side's
saved EMA model is scored by the same evaluator: the denoising loss on the 360 held-out digits at fixed timesteps
and noise (seeded per image). Images/s counts the training images of every epoch.

SFT_BENCH_SMOKE=1 (a check of the wiring, not a benchmark): 2 optimizer steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import encoder_tasks  # benchmarks/ is on the path, as run.py puts it

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / ".work"
SMOKE = os.environ.get("SFT_BENCH_SMOKE") == "1"
DATA = WORK / "digits-gen"
BASE = WORK / "unet-base"
RUN = {"epochs": 10, "batch_size": 64, "lr": 1e-3, "warmup": 50, "ema_decay": 0.999, "size": 16}
UNET = {"block_out_channels": [32, 64, 64], "layers_per_block": 1}
SMOKE_STEPS = 2
PREFIXES = ("diff/",)
SEEDS = (42, 2)  # two seeds a side, alternating: the machine's speed drifts between runs


def seed_of(name: str) -> int:
    return encoder_tasks.seed_of(name, SEEDS[0])


def make_base() -> Path:
    """The digits and the shared starting point: a random-init UNet and its (cosine) noise schedule."""
    if not (DATA / "test").is_dir():
        subprocess.run(
            [sys.executable, str(REPO / "scripts" / "make_digit_images.py"), str(DATA), "--size", str(RUN["size"])],
            check=True,
        )
    if (BASE / "config.json").exists():
        return BASE
    import torch
    from diffusers import DDPMScheduler

    from sft_cli.tasks.image_generation import unet_from_scratch

    torch.manual_seed(0)
    unet_from_scratch("unet2d", UNET, RUN["size"], 1).save_pretrained(BASE)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").save_pretrained(BASE)
    return BASE


def held_out_loss(model_dir: Path) -> float:
    """The one evaluator: mean denoising loss on the test digits at per-image seeded timesteps and noise."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DModel
    from PIL import Image

    unet = UNet2DModel.from_pretrained(str(model_dir)).eval()
    scheduler = DDPMScheduler.from_pretrained(str(BASE))
    paths = sorted((DATA / "test").glob("*/*.png"))
    losses = []
    with torch.no_grad():
        for index, path in enumerate(paths):
            generator = torch.Generator().manual_seed(index)
            step = torch.randint(0, 1000, (1,), generator=generator)
            noise = torch.randn(1, 1, RUN["size"], RUN["size"], generator=generator)
            clean = torch.from_numpy(np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 127.5 - 1)[
                None, None
            ]
            prediction = unet(scheduler.add_noise(clean, noise, step), step).sample
            losses.append(float(F.mse_loss(prediction, noise)))
    return float(np.mean(losses))


def sft_run(name: str) -> dict:
    from run import run_sft  # the entry point's helper, imported when the row runs

    schedule = {"epochs": RUN["epochs"], "batch_size": RUN["batch_size"], "warmup": RUN["warmup"]}
    schedule.update(scheduler="cosine", log_every=50, eval_every=str(10**9))  # one evaluation, at the end
    if SMOKE:
        schedule["max_steps"] = SMOKE_STEPS
    values = {
        "task": "image-generation",
        "backbone": {"name": str(BASE)},
        "data": {"train": str(DATA / "unlabeled"), "eval": str(DATA / "test")},
        "optim": {"lr": RUN["lr"], "weight_decay": 0.0},
        "schedule": schedule,
        "engine": {"seed": seed_of(name), "precision": "fp32", "ema": True, "ema_decay": RUN["ema_decay"]},
        "eval": {"num_samples": 8, "num_inference_steps": 5},
    }
    result = run_sft(name, values, ("loss",), command="pretrain")
    result["images_per_s"] = result.pop("tokens_per_s")
    result["model"] = str(WORK / name / "model")
    return result


def diffusers_run(name: str) -> dict:
    """train_unconditional.py's loop (its defaults where the recipe above does not fix a value)."""
    import math
    import time

    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from datasets import load_dataset
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from transformers import set_seed

    set_seed(seed_of(name))
    accelerator = Accelerator(mixed_precision="no")
    model = UNet2DModel.from_pretrained(str(BASE))
    ema = EMAModel(model.parameters(), decay=RUN["ema_decay"], use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    noise_scheduler = DDPMScheduler.from_pretrained(str(BASE))
    optimizer = torch.optim.AdamW(model.parameters(), lr=RUN["lr"], betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    dataset = load_dataset("imagefolder", data_dir=str(DATA / "unlabeled"), split="train")

    def transform(examples: dict) -> dict:
        images = [
            np.asarray(im.convert("L").resize((RUN["size"], RUN["size"])), dtype=np.float32) for im in examples["image"]
        ]
        return {"input": [torch.from_numpy(im / 127.5 - 1.0)[None] for im in images]}

    dataset.set_transform(transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=RUN["batch_size"], shuffle=True, num_workers=0)
    steps = SMOKE_STEPS if SMOKE else math.ceil(len(loader)) * RUN["epochs"]
    lr_scheduler = get_scheduler(
        "cosine", optimizer=optimizer, num_warmup_steps=RUN["warmup"], num_training_steps=steps
    )
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    done, images, started = 0, 0, time.perf_counter()
    while done < steps:
        model.train()
        for batch in loader:
            clean = batch["input"]
            noise = torch.randn(clean.shape, dtype=clean.dtype, device=clean.device)
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],), device=clean.device
            )
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            with accelerator.accumulate(model):
                loss = F.mse_loss(model(noisy, timesteps, return_dict=False)[0].float(), noise.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                ema.step(model.parameters())
                done += 1
                images += clean.shape[0]
            if done >= steps:
                break
    seconds = time.perf_counter() - started
    unet = accelerator.unwrap_model(model)
    ema.copy_to(unet.parameters())
    unet.save_pretrained(str(WORK / name / "model"))
    return {
        "images_per_s": images / seconds,
        "train_seconds": seconds,
        "train_images": images,
        "model": str(WORK / name / "model"),
    }


SIDES = {"diff/diffusers-loop": diffusers_run, "diff/sft": sft_run}
RUNS = {**SIDES, **{f"{name}-seed{seed}": run for seed in SEEDS[1:] for name, run in SIDES.items()}}


def finish(result: dict) -> dict:
    """After peak RSS is read: the one evaluator scores the row's saved EMA model."""
    if "model" in result:
        result["eval_loss"] = held_out_loss(Path(result.pop("model")))
    return result


def report(results: dict) -> list[str]:
    """The RESULTS.md section: sft and the diffusers loop side by side, sft's speed and memory as ratios."""
    rows = {k: v for k, v in results.items() if k.startswith(PREFIXES)}
    if not rows:
        return []
    lines = [
        "",
        "## Image generation: unconditional diffusion (UNet2DModel, 16x16 digits)",
        "",
        f"Both sides: the same random-init UNet2DModel (block channels {UNET['block_out_channels']}, "
        f"{UNET['layers_per_block']} layer per block, attention at the two lower resolutions, 1.2M parameters), "
        f"the 1,437 unlabelled digits of scripts/make_digit_images.py, {RUN['epochs']} epochs, batch "
        f"{RUN['batch_size']}, AdamW LR {RUN['lr']} (no weight decay), cosine schedule, {RUN['warmup']} warmup steps, "
        f"gradient clipping 1.0, EMA (decay {RUN['ema_decay']}, diffusers' EMAModel), cosine noise schedule, epsilon "
        "prediction, fp32, seeds "
        f"{', '.join(map(str, SEEDS))} on each side (runs alternate). The peer is the training loop of diffusers' "
        "train_unconditional.py; both saved EMA models are scored by one evaluator (denoising loss on the 360 "
        "held-out digits at fixed seeded timesteps and noise). × peer: against the peer run of the same seed.",
        "",
        "| run | images/s | × peer | wall s | peak RSS MB | × peer | held-out loss |",
        "|---|---|---|---|---|---|---|",
    ]
    sides = ("diff/diffusers-loop", "diff/sft")
    lines += encoder_tasks.seeded_rows(
        rows, "diff/diffusers", sides, seed_of, "images_per_s", ",.1f", (("eval_loss", ".4f", True),)
    )
    return lines
