"""Image generation through the real CLI on a tiny UNet and 8x8 digits: unconditional pretraining, then
class-conditional fine-tuning from it (EMA, guidance, the loss mix), eval (FID, IS, class accuracy, sample grids),
predict (PNG files + index, resumable), export (diffusers alone reloads it in a fresh process and draws the same
image for the same seed), and kill -9 + --resume reproducing the uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import (
    build_tiny_image_classifier,
    diffusion_values,
    invoke_cli,
    read_jsonl,
    write_recipe,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digit_folders):
    tmp = tmp_path_factory.mktemp("diffusion")
    classifier = build_tiny_image_classifier(tmp / "classifier")
    pretrain = write_recipe(
        tmp / "pretrain.yaml",
        diffusion_values(
            tmp, digit_folders, schedule={"max_steps": 24, "eval_every": "12"}, output={"dir": str(tmp / "pretrain")}
        ),
    )
    invoke_cli("pretrain", str(pretrain))
    finetune = write_recipe(
        tmp / "finetune.yaml",
        diffusion_values(
            tmp,
            digit_folders,
            backbone={"name": str(tmp / "pretrain" / "model"), "from_scratch": False, "arch": None, "config": {}},
            data={"train": str(digit_folders / "labeled"), "unlabeled": str(digit_folders / "unlabeled")},
            loss={"lm": 0.5},
            engine={"ema": True, "ema_decay": 0.99},
            eval={"guidance_scale": 2.0, "feature_model": str(classifier)},
            output={"dir": str(tmp / "finetune")},
        ),
    )
    invoke_cli("finetune", str(finetune))
    invoke_cli("eval", str(finetune))
    return tmp


def test_pretraining_lowers_the_held_out_denoising_loss_and_draws_sample_grids(runs):
    run = runs / "pretrain"
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 12, 24]
    assert evals[-1]["eval_loss"] < 0.5 * evals[0]["eval_loss"]  # quality rises: deterministic held-out loss
    assert all((run / "samples" / f"step-{r['step']}.png").exists() for r in evals)
    assert json.loads((run / "model" / "sft_diffusion.json").read_text())["mode"] == "unconditional"


def test_fine_tuning_is_class_conditional_and_eval_reports_fid(runs):
    from PIL import Image

    run = runs / "finetune"
    metrics = json.loads((run / "eval.json").read_text())
    assert {"loss", "fid", "fid_features", "inception_score", "class_accuracy", "num_samples"} <= set(metrics)
    assert metrics["num_samples"] == 6 and metrics["fid"] >= 0 and 0 <= metrics["class_accuracy"] <= 1
    assert "resnet" in metrics["fid_features"]
    summary = json.loads((run / "summary.json").read_text())
    # step 0 of fine-tuning is the pretrained model (zero class embeddings, EMA of the same weights)
    pretrained = json.loads((runs / "pretrain" / "summary.json").read_text())["eval"]["eval_loss"]
    assert summary["initial_eval"]["eval_loss"] == pytest.approx(pretrained, rel=1e-5)
    records = read_jsonl(run / "metrics.jsonl")
    assert any("loss_lm" in r for r in records)  # the loss mix's unconditional term on data.unlabeled
    grid = Image.open(run / "samples.png")
    assert grid.size[1] == 3 * (8 + 2)  # one row per class
    assert json.loads((run / "model" / "sft_diffusion.json").read_text())["labels"] == ["0", "1", "2"]
    assert (run / "report.png").exists()


def test_predict_writes_images_in_input_order_and_resumes(runs):
    rows = [{"label": "2", "seed": 5}, {"label": "0", "num_images": 2}, {"label": "1"}]
    source = runs / "draw.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = runs / "drawn.jsonl"
    invoke_cli("predict", str(runs / "finetune"), "--input", str(source), "--output", str(output))
    written = read_jsonl(output)
    assert [r["label"] for r in written] == ["2", "0", "1"]
    assert written[0]["seed"] == 5 and isinstance(written[1]["path"], list) and len(written[1]["path"]) == 2
    assert written[2]["seed"] == 2  # engine.seed (0) + its row number
    for row in written:
        for path in row["path"] if isinstance(row["path"], list) else [row["path"]]:
            assert (output.parent / path).exists()
    invoke_cli("predict", str(runs / "finetune"), "--input", str(source), "--output", str(output), "--resume")
    assert len(read_jsonl(output)) == 3
    bad = runs / "bad.jsonl"
    bad.write_text(json.dumps({"label": "9"}) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "sft_cli", "predict", str(runs / "finetune"), "--input", str(bad)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "row 1 asks for class '9'" in result.stderr
    assert "Traceback" not in result.stderr


def test_export_reloads_with_diffusers_alone_and_draws_the_same_images(runs):
    for name in ("pretrain", "finetune"):
        invoke_cli("export", str(runs / name), "--to", str(runs / f"{name}-export"))
    card = (runs / "finetune-export" / "README.md").read_text()
    assert "pipeline_tag: unconditional-image-generation" in card and "library_name: diffusers" in card
    source = runs / "one.jsonl"
    source.write_text(json.dumps({"seed": 11}) + "\n")
    invoke_cli("predict", str(runs / "pretrain"), "--input", str(source), "--output", str(runs / "one-out.jsonl"))
    unconditional = read_jsonl(runs / "one-out.jsonl")[0]["path"]
    conditional = read_jsonl(runs / "drawn.jsonl")[0]["path"] if (runs / "drawn.jsonl").exists() else None
    script = textwrap.dedent(
        f"""
        import sys, numpy, torch
        from PIL import Image
        from diffusers import DDPMPipeline, DiffusionPipeline
        plain = DDPMPipeline.from_pretrained({str(runs / "pretrain-export")!r})
        image = plain(generator=torch.Generator().manual_seed(11), num_inference_steps=3).images[0]
        assert numpy.array_equal(numpy.asarray(image), numpy.asarray(Image.open({str(runs / unconditional)!r})))
        conditional = {str(runs / conditional) if conditional else None!r}
        if conditional:
            pipe = DiffusionPipeline.from_pretrained({str(runs / "finetune-export")!r}, trust_remote_code=True)
            image = pipe(class_labels=["2"], guidance_scale=2.0, generator=torch.Generator().manual_seed(5),
                         num_inference_steps=3).images[0]
            assert numpy.array_equal(numpy.asarray(image), numpy.asarray(Image.open(conditional)))
        assert not any(name.startswith("sft_cli") for name in sys.modules)
        print("same")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode == 0 and "same" in result.stdout, result.stderr[-2000:]


def test_kill_9_then_resume_gives_the_uninterrupted_losses(tmp_path, digit_folders):
    from tests.integration.test_schedules_resume import whole_and_resumed_losses

    def recipe(name: str) -> Path:
        values = diffusion_values(
            tmp_path,
            digit_folders,
            schedule={"max_steps": 80, "batch_size": 8, "log_every": 1, "eval_every": "80"},
            engine={"ema": True, "ema_decay": 0.99},
            eval={"num_samples": 2, "num_inference_steps": 2},
            output={"dir": str(tmp_path / name), "save_every": 10, "keep": 2},
        )
        return write_recipe(tmp_path / f"{name}.yaml", values)

    losses = whole_and_resumed_losses("pretrain", recipe("whole"), recipe("killed"), 20)
    assert len(losses[0]) == 80 and losses[1] == pytest.approx(losses[0], abs=1e-6)
    evals = [json.loads((tmp_path / n / "summary.json").read_text())["eval"]["eval_loss"] for n in ("whole", "killed")]
    assert evals[1] == pytest.approx(evals[0], abs=1e-6)  # the EMA weights resumed too
