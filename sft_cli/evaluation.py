"""Held-out evaluation over processes: each rank scores its shard, results are gathered once each."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from sft_cli.tasks.base import Batch, Task


def evaluate(
    task: Task, model: torch.nn.Module, accelerator: Accelerator, batch_size: int, final: bool = True
) -> dict[str, Any]:
    """Run `task.evaluate` over this process's shard of the eval split (no padding duplicates)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    indices = list(range(len(task.eval_set)))[rank::world]
    lengths = task.lengths("eval")
    if lengths is not None:  # sorted by length: least padding, and order does not matter for metrics
        indices.sort(key=lambda i: -lengths[i])
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    loader = DataLoader(
        task.eval_set,
        batch_sampler=batches,
        collate_fn=lambda rows: task.collate(rows, train=False),
        generator=torch.Generator(),
    )
    device = accelerator.device

    def on_device(batch: Batch) -> Batch:
        return {k: v.to(device) for k, v in batch.items()}

    def gather(items: list) -> list:
        return gather_object(items) if world > 1 else items

    model.eval()
    with torch.inference_mode(), accelerator.autocast():
        return task.evaluate(model, (on_device(b) for b in loader), gather, final)
