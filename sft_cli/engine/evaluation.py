"""Held-out evaluation over processes: each rank scores its shard, results are gathered once each."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from sft_cli.engine.parallel import Parallel
from sft_cli.errors import SftError
from sft_cli.tasks.base import Batch, Task


def even_batches(total: int, indices: list[int], batch_size: int, world: int) -> list[list[int]]:
    """This rank's examples in as many batches as every other rank has (sizes differ by at most one)."""
    if total < world:
        raise SftError(f"data.eval: {total} example(s) cannot be sharded over {world} processes")
    count = min(math.ceil(math.ceil(total / world) / batch_size), total // world)  # rank 0's count, none empty
    return [part.tolist() for part in np.array_split(np.asarray(indices), count)]


def evaluate_over_processes(
    task: Task,
    model: torch.nn.Module,
    accelerator: Accelerator,
    batch_size: int,
    final: bool = True,
    parallel: Optional[Parallel] = None,
) -> dict[str, Any]:
    """Run `task.evaluate` over this process's shard of the eval split (no padding duplicates); `parallel` is the
    training run's strategy (a model loaded whole when None)."""
    parallel = parallel or Parallel(accelerator)
    world, rank = accelerator.num_processes, accelerator.process_index
    indices = list(range(len(task.eval_set)))[rank::world]
    lengths = task.lengths("eval")
    if lengths is not None:  # sorted by length: least padding, and order does not matter for metrics
        indices.sort(key=lambda i: -lengths[i])
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    if world > 1 and parallel.collective_forwards(model):  # as many batches on every rank
        batches = even_batches(len(task.eval_set), indices, batch_size, world)
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
    with parallel.eval_mode(), accelerator.autocast():
        return task.evaluate(model, (on_device(b) for b in loader), gather, final)
