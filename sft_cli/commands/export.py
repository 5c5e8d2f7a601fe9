"""`sft export`: a self-contained Hugging Face model directory that plain transformers loads (no sft needed)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional

from sft_cli.commands.model_card import write_card
from sft_cli.engine.accelerator import PRECISION_DTYPES
from sft_cli.errors import SftError
from sft_cli.model import backbone as bb
from sft_cli.rundir import manifest
from sft_cli.rundir.atomic import atomic_directory
from sft_cli.rundir.layout import model_directory, resolve_run
from sft_cli.tasks.registry import build_task

log = logging.getLogger("sft")
SIDE_FILES = ("sft_preprocess.json", "sft_generation.json", "sft_seq2seq_pipeline.py", "sft_speech.json")


def export(
    run: Path,
    target: Path,
    merge_lora: bool,
    dtype: Optional[str],
    model: Optional[Path] = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the run's model (merged LoRA on request) with tokenizer, generation config and a model card."""
    if dtype is not None and dtype not in PRECISION_DTYPES:
        raise SftError(f"--dtype: '{dtype}' is not one of {', '.join(PRECISION_DTYPES)}")
    recipe, run_dir = resolve_run(run)
    source = model_directory(run_dir, model)
    _check_target(target, run_dir, source, overwrite)
    adapter = (source / "adapter_config.json").exists()
    if merge_lora and not adapter:
        log.warning("--merge-lora: %s has no LoRA adapter (a full model), so there is nothing to merge", source)
    task = build_task(recipe)
    task.load_for_inference(str(source))
    network = bb.unwrap(task.model)
    if adapter and merge_lora:
        network = network.merge_and_unload()
    if dtype is not None:
        network = network.to(PRECISION_DTYPES[dtype])
    with atomic_directory(target) as tmp:
        if task.export(network, tmp):  # the task's own format (a diffusers pipeline)
            write_card(recipe, run_dir, tmp, getattr(task, "names", None))
            return {"to": str(target), "merged": False, "adapter": False, "dtype": dtype}
        network.save_pretrained(tmp, safe_serialization=True)
        if adapter and not merge_lora:  # an adapter export stays an adapter: keep the task config beside it
            network.get_base_model().config.save_pretrained(tmp)
        tokenizer = getattr(task, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        feature_extractor = getattr(task, "feature_extractor", None)  # speech: preprocessor_config.json
        if feature_extractor is not None:
            feature_extractor.save_pretrained(tmp)
        for name in SIDE_FILES:
            if (source / name).exists():
                shutil.copy2(source / name, tmp / name)
        if (source / "sft_preprocess.json").exists():
            _image_processor(json.loads((source / "sft_preprocess.json").read_text()), tmp)
        write_card(recipe, run_dir, tmp, getattr(task, "names", None))
    return {"to": str(target), "merged": adapter and merge_lora, "adapter": adapter and not merge_lora, "dtype": dtype}


def _check_target(target: Path, run_dir: Path, source: Path, overwrite: bool) -> None:
    """--to must be a new (or, with --overwrite, replaceable) directory that is not part of what is exported."""
    if target.exists() and not target.is_dir():
        raise SftError(f"--to: {target} is a file — choose a directory to write")
    resolved, run, model = target.resolve(), run_dir.resolve(), source.resolve()
    inside_run = run in resolved.parents and resolved.relative_to(run).parts[0] in manifest.RUN_PATHS
    if resolved in (run, model) or resolved in run.parents or resolved in model.parents or model in resolved.parents:
        inside_run = True
    if inside_run:
        raise SftError(
            f"--to: {target} is or overlaps the run being exported ({run_dir}) — choose a directory outside it"
        )
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise SftError(f"--to: {target} exists and is not empty — choose a new directory or pass --overwrite")


def _image_processor(settings: dict[str, Any], directory: Path) -> None:
    """A preprocessor_config.json doing what sft did (resize, scale to [0, 1], normalize), for pipelines."""
    from transformers import ViTImageProcessor

    size = settings["image_size"]
    ViTImageProcessor(
        do_resize=True,
        size={"height": size, "width": size},
        resample=3,  # bicubic, PIL's resize default that training used
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=settings["mean"],
        image_std=settings["std"],
    ).save_pretrained(directory)
