"""summary.json for a training run: throughput, memory, MFU, where the schedule ended and the best eval."""

from __future__ import annotations

import resource
from typing import Any

import torch

from sft_cli.engine.accelerator import autocast_dtype, measure_peak_flops
from sft_cli.model.backbone import compile_seconds


def training_summary(trainer: Any) -> dict[str, Any]:
    """What summary.json records about a finished (or stopped) `Trainer` run (engine/trainer.py)."""
    seconds = max(trainer.state.train_seconds, 1e-9)
    tokens_per_s = trainer.state.tokens / seconds
    flops = trainer.flops_per_token * trainer.state.tokens
    dtype = autocast_dtype(trainer.accelerator.mixed_precision)
    peak = (
        trainer.engine.peak_tflops * 1e12
        if trainer.engine.peak_tflops
        else measure_peak_flops(trainer.accelerator.device, dtype)
    )
    return {
        "train_seconds": round(trainer.state.train_seconds, 3),
        "train_tokens": int(trainer.state.tokens),
        "tokens_per_s": round(tokens_per_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        **trainer.params,
        "final_train_loss": trainer.state.last_loss,
        "steps": trainer.state.step,
        "epochs": round(trainer.epoch_progress(), 4),
        "best_step": trainer.state.best_step,
        "best_metric": trainer.state.best_metric,
        "skipped_nonfinite": trainer.state.skipped_nonfinite,
        "train_flops": flops,
        "flops_per_token": trainer.flops_per_token,
        "peak_flops": peak,
        "mfu": round(flops / seconds / peak, 4),
        "device": str(trainer.accelerator.device),
        "precision": trainer.accelerator.mixed_precision,
        "num_processes": trainer.accelerator.num_processes,
        **compile_report(trainer.engine.compile),
        **mixture_report(trainer),
    }


def mixture_report(trainer: Any) -> dict[str, Any]:
    """A data.train mixture: its sources (rows, rows per epoch, share) and the tokens and examples each trained,
    summed over processes."""
    mixture = trainer.task.mixture
    if mixture is None:
        return {}
    from accelerate.utils import gather_object

    ranks = gather_object([[trainer.state.tokens_per_source, trainer.state.examples_per_source]])
    keys = [s.key for s in mixture.sources]
    tokens = {k: sum(r[0].get(k, 0) for r in ranks) for k in keys}
    examples = {k: sum(r[1].get(k, 0) for r in ranks) for k in keys}
    return {"mixture": mixture.describe(), "tokens_per_source": tokens, "examples_per_source": examples}


def compile_report(compiled: bool) -> dict[str, Any]:
    """engine.compile: seconds spent compiling (training and evaluation graphs) and how many were built."""
    if not compiled:
        return {}
    seconds, graphs = compile_seconds()
    return {"compile_seconds": round(seconds, 3), "compiled_graphs": graphs}
