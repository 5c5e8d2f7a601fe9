"""Image generation pieces on tiny random-init UNets and 8x8 digits: the denoising loss falls, the zero-initialized
class embedding keeps the pretrained model, classes and guidance, FID, the latent LoRA path, one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sft_cli.errors import SftError
from tests.conftest import TINY_UNET, build_tiny_image_classifier, diffusion_values, write_recipe


def generation_task(tmp: Path, digits: Path, command: str = "pretrain", train: bool = True, **sections: Any):
    from sft_cli.config.recipe import load_recipe
    from sft_cli.tasks.registry import build_task

    task = build_task(load_recipe(write_recipe(tmp / "recipe.yaml", diffusion_values(tmp, digits, **sections))))
    task.command = command
    task.setup(train=train)
    return task


def tiny_unet(classes: int = 0) -> Any:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    extra = {"num_class_embeds": classes + 1} if classes else {}
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        **TINY_UNET,
        **extra,
        down_block_types=["DownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "UpBlock2D"],
    )


def test_denoising_loss_falls_on_a_few_images(tmp_path, digit_folders):
    task = generation_task(tmp_path, digit_folders)
    assert task.mode == "unconditional" and task.channels == 1 and task.size == 8
    rows = [task.eval_set[i] for i in range(len(task.eval_set))]
    fixed = task.collate(rows, train=False)  # fixed noise and timesteps: a deterministic loss
    again = task.collate(rows, train=False)
    assert torch.equal(fixed["noise"], again["noise"]) and torch.equal(fixed["timesteps"], again["timesteps"])

    def held_out() -> float:
        with torch.no_grad():
            return float(
                task.denoising_losses(task.model, fixed["pixel_values"], {}, fixed["noise"], fixed["timesteps"]).mean()
            )

    before = held_out()
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=2e-3)
    train_rows = [task.train_set[i] for i in range(16)]
    for _ in range(40):
        total, count = task.loss_terms(task.model, task.collate(train_rows, train=True))["sup"]
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert held_out() < 0.6 * before


def test_zero_class_embedding_gives_the_pretrained_output_exactly():
    from sft_cli.tasks.image_generation import with_class_embedding

    pretrained = tiny_unet().eval()
    conditioned = with_class_embedding(pretrained, 3).eval()
    assert conditioned.config.num_class_embeds == 4  # 3 classes + the null class
    noisy, steps = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        expected = pretrained(noisy, steps).sample
        for labels in ([0, 1, 2, 3], [2, 2, 2, 2]):
            assert torch.equal(conditioned(noisy, steps, class_labels=torch.tensor(labels)).sample, expected)


def test_classes_differ_and_the_null_class_at_guidance_1_is_the_unconditional_sample():
    from diffusers import DDIMScheduler, DDPMPipeline

    from sft_cli.tasks.diffusion_pipeline import SftClassConditionalPipeline
    from sft_cli.tasks.image_generation import with_class_embedding

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    pretrained = tiny_unet().eval()
    conditioned = with_class_embedding(pretrained, 2).eval()
    pipe = SftClassConditionalPipeline(unet=conditioned, scheduler=scheduler, labels=["a", "b"])

    def draw(**kwargs: Any) -> np.ndarray:
        return pipe(
            generator=torch.Generator().manual_seed(3), num_inference_steps=4, output_type="np", **kwargs
        ).images

    unconditional = DDPMPipeline(unet=pretrained, scheduler=scheduler)(
        generator=torch.Generator().manual_seed(3), num_inference_steps=4, output_type="np"
    ).images
    assert np.array_equal(draw(class_labels=[None], guidance_scale=1.0), unconditional)
    assert np.allclose(draw(class_labels=[None], guidance_scale=3.0), unconditional, atol=1e-6)
    with torch.no_grad():  # as if fine-tuned: the classes now move the model
        conditioned.class_embedding.weight.normal_(0, 1.0)
    a, b = draw(class_labels=["a"], guidance_scale=2.0), draw(class_labels=["b"], guidance_scale=2.0)
    assert np.abs(a - b).mean() > 0.01
    assert np.array_equal(draw(class_labels=["a"], guidance_scale=2.0), a)  # same seed, same image
    with pytest.raises(ValueError, match="not one this model was trained on"):
        draw(class_labels=["c"])


@pytest.fixture(scope="module")
def feature_classifier(tmp_path_factory) -> Path:
    return build_tiny_image_classifier(tmp_path_factory.mktemp("classifier"))


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_perturbation(feature_classifier):
    from sklearn.datasets import load_digits

    from sft_cli.tasks.image_quality import image_quality, load_feature_model

    network, description = load_feature_model(str(feature_classifier))
    assert "resnet" in description and network.num_features == 32
    real = torch.from_numpy(load_digits().images[:300] / 16.0).float()[:, None]
    generator = torch.Generator().manual_seed(0)
    fids = []
    for strength in (0.0, 0.1, 0.3):
        fake = (real + strength * torch.randn(real.shape, generator=generator)).clamp(0, 1)
        metrics = image_quality(network, description, fake, real, ["0"] * len(real))
        fids.append(metrics["fid"])
        assert {"fid", "fid_features", "inception_score", "class_accuracy"} <= set(metrics)
    assert fids[0] == pytest.approx(0.0, abs=1e-3)
    assert fids[0] < fids[1] < fids[2]


def test_a_feature_model_that_is_no_image_classifier_is_refused(tmp_path):
    from sft_cli.model.backbone import embedded_aliases
    from sft_cli.tasks.image_quality import load_feature_model

    with pytest.raises(SftError, match="eval.feature_model: .* not an image classifier"):
        load_feature_model(str(embedded_aliases()["minilm-l6"]))
    with pytest.raises(SftError, match="eval.feature_model: .* is not a model directory"):
        load_feature_model(str(tmp_path))


def test_mixed_sizes_unknown_classes_and_bad_recipes_are_one_line_errors(tmp_path, digit_folders):
    import shutil

    from PIL import Image

    mixed = tmp_path / "mixed"
    shutil.copytree(digit_folders / "unlabeled", mixed)
    Image.new("L", (12, 12)).save(mixed / "big.png")
    with pytest.raises(
        SftError, match=r"data.train: images of different sizes \(8x8 and 12x12\) — set data.image_size"
    ):
        generation_task(tmp_path, digit_folders, data={"train": str(mixed)})
    resized = generation_task(tmp_path, digit_folders, data={"train": str(mixed), "image_size": 8})
    assert resized.size == 8 and len(resized.train_set) == 49
    extra = tmp_path / "extra"
    shutil.copytree(digit_folders / "test", extra)
    shutil.copytree(digit_folders / "test" / "0", extra / "7")
    with pytest.raises(SftError, match="data.eval: class\\(es\\) 7 have no embedding in this model"):
        generation_task(
            tmp_path, digit_folders, "finetune", data={"train": str(digit_folders / "labeled"), "eval": str(extra)}
        )
    with pytest.raises(SftError, match="loss.lm: the unconditional denoising term needs data.unlabeled"):
        generation_task(
            tmp_path, digit_folders, "finetune", data={"train": str(digit_folders / "labeled")}, loss={"lm": 0.5}
        )


def test_class_conditional_training_with_the_loss_mix_and_condition_dropout(tmp_path, digit_folders):
    task = generation_task(
        tmp_path,
        digit_folders,
        "finetune",
        data={"train": str(digit_folders / "labeled"), "unlabeled": str(digit_folders / "unlabeled")},
        loss={"lm": 0.5, "cond_dropout": 0.5, "snr_gamma": 5.0},
    )
    assert task.mode == "class" and task.names == ["0", "1", "2"]
    torch.manual_seed(0)
    batch = task.collate([task.train_set[i] for i in range(len(task.train_set))], train=True)
    dropped = (batch["class_labels"] == 3).float().mean()
    assert 0.2 < dropped < 0.8  # half the conditions become the null class
    assert batch["aux_pixel_values"].shape == batch["pixel_values"].shape
    terms = task.loss_terms(task.model, batch)
    assert set(terms) == {"sup", "lm"} and all(torch.isfinite(total) for total, _ in terms.values())
    assert task.counts(batch) == {"sup": torch.tensor(18), "lm": torch.tensor(18)}
    from sft_cli.config.schema import OptimConfig
    from sft_cli.engine.optim import build_optimizer
    from sft_cli.tasks.image_generation import CLASS_EMBEDDING_LR_SCALE

    optimizer = build_optimizer(task.model, OptimConfig(lr=1e-3), task.lr_scales())
    embedding = task.model.class_embedding.weight
    group = next(g for g in optimizer.param_groups if any(p is embedding for p in g["params"]))
    assert group["lr"] == pytest.approx(1e-3 * CLASS_EMBEDDING_LR_SCALE)  # the zero-initialized rows train faster
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


def build_tiny_latent_pipeline(directory: Path) -> Path:
    """A Stable Diffusion-style pipeline directory from tiny random-init parts: VAE, text encoder + tokenizer
    (a 2-layer BERT with MiniLM's vocabulary), cross-attention UNet, scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, BertConfig, BertModel

    from sft_cli.model.backbone import embedded_aliases

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_aliases()["minilm-l6"]))
    tokenizer.model_max_length = 8
    text = BertModel(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=[16, 16],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=8,
        sample_size=8,
    )
    unet = UNet2DConditionModel(
        sample_size=4,
        in_channels=4,
        out_channels=4,
        block_out_channels=[32, 32],
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=8,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    )
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(directory)
    return directory


def test_latent_lora_path_runs_a_step_on_tiny_components(tmp_path, digit_folders):
    import json

    from sft_cli.commands import train as commands
    from sft_cli.config.recipe import load_recipe

    pipeline = build_tiny_latent_pipeline(tmp_path / "sd")
    rows = []
    for label in ("0", "1"):
        for path in sorted((digit_folders / "labeled" / label).glob("*.png")):
            rows.append({"image": str(path), "caption": f"a handwritten {['zero', 'one'][int(label)]}"})
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    values = diffusion_values(
        tmp_path,
        digit_folders,
        backbone={"name": str(pipeline), "from_scratch": False, "arch": None, "config": {}},
        data={
            "train": str(tmp_path / "captions.jsonl"),
            "eval": str(tmp_path / "captions.jsonl"),
            "caption_field": "caption",
        },
        freeze={"policy": "lora", "lora": {"r": 4, "alpha": 4}},
        schedule={"max_steps": 1, "batch_size": 4, "eval_every": "1"},
        eval={"num_samples": 2, "num_inference_steps": 2, "guidance_scale": 2.0},
    )
    recipe = load_recipe(write_recipe(tmp_path / "latent.yaml", values))
    summary = commands.train(recipe, "finetune")
    assert summary["steps"] == 1 and np.isfinite(summary["final_train_loss"])
    assert 0 < summary["trainable_params"] < 0.2 * summary["total_params"]  # LoRA on the attention only
    model = tmp_path / "run" / "model"
    assert (model / "unet_lora" / "adapter_config.json").exists()
    assert json.loads((model / "sft_diffusion.json").read_text())["latent_pipeline"] == str(pipeline)
    assert (tmp_path / "run" / "samples" / "step-1.png").exists()
    from diffusers import StableDiffusionPipeline

    from sft_cli.commands.export import export

    export(tmp_path / "run", tmp_path / "exported", merge_lora=False, dtype="bf16")
    exported = StableDiffusionPipeline.from_pretrained(str(tmp_path / "exported"), torch_dtype=torch.bfloat16)
    assert exported.unet.dtype == torch.bfloat16
    from safetensors import safe_open

    for part in ("unet", "vae", "text_encoder"):  # every component was written in bf16
        (weights,) = (tmp_path / "exported" / part).glob("*.safetensors")
        with safe_open(str(weights), "pt") as f:
            assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16, part


def test_text_conditional_fine_tuning_from_a_pretrained_cross_attention_unet(tmp_path, digit_folders):
    import json

    from diffusers import DiffusionPipeline

    from sft_cli.commands import train as commands
    from sft_cli.commands.export import export
    from sft_cli.config.recipe import load_recipe

    text_unet = {**TINY_UNET, "cross_attention_dim": 384}
    base = {"arch": "unet2d-condition", "config": text_unet}
    pretrain = diffusion_values(
        tmp_path, digit_folders, backbone=base, schedule={"max_steps": 2}, output={"dir": str(tmp_path / "pre")}
    )
    commands.train(load_recipe(write_recipe(tmp_path / "pre.yaml", pretrain)), "pretrain")
    assert (tmp_path / "pre" / "model" / "text_encoder" / "config.json").exists()  # MiniLM, frozen, saved with it
    rows = [
        {"image": str(path), "caption": f"the digit {['zero', 'one', 'two'][int(path.parent.name)]}"}
        for path in sorted((digit_folders / "labeled").glob("*/*.png"))
    ]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    finetune = diffusion_values(
        tmp_path,
        digit_folders,
        backbone={"name": str(tmp_path / "pre" / "model"), "from_scratch": False, "arch": None, "config": {}},
        data={
            "train": str(tmp_path / "captions.jsonl"),
            "eval": str(tmp_path / "captions.jsonl"),
            "caption_field": "caption",
        },
        schedule={"max_steps": 2, "eval_every": "2"},
        eval={"num_samples": 3, "num_inference_steps": 2, "guidance_scale": 3.0},
        output={"dir": str(tmp_path / "text")},
    )
    recipe = write_recipe(tmp_path / "text.yaml", finetune)
    summary = commands.train(load_recipe(recipe), "finetune")
    assert summary["trainable_params"] == summary["total_params"]  # the UNet trains; the text encoder is not in it
    meta = json.loads((tmp_path / "text" / "model" / "sft_diffusion.json").read_text())
    assert meta["mode"] == "text"
    export(tmp_path / "text", tmp_path / "exported", merge_lora=False, dtype=None)
    assert "pipeline_tag: text-to-image" in (tmp_path / "exported" / "README.md").read_text()
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "exported"), trust_remote_code=True)
    assert type(pipe).__name__ == "SftTextToImagePipeline"
    images = pipe(
        prompt=["the digit one", "the digit two"],
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=2,
        guidance_scale=3.0,
        output_type="np",
    ).images
    assert images.shape == (2, 8, 8, 1) and not np.array_equal(images[0], images[1])
