"""How the model is spread over processes: ddp, FSDP2 and DeepSpeed behind one interface (`Parallel`).

The training loop, evaluation and the checkpointer call only the interface; `for_training` picks the strategy
once, from the recipe's engine.distributed and what Accelerate set up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sft_cli.engine.parallel.base import Parallel, Sharded
from sft_cli.engine.parallel.deepspeed import DeepSpeed
from sft_cli.engine.parallel.fsdp import FSDP

__all__ = ["Parallel", "Sharded", "FSDP", "DeepSpeed", "for_training", "written_by"]


def for_training(strategy: str, accelerator: Any, schedule: Any) -> Parallel:
    """The strategy a training run uses: engine.distributed.strategy as this accelerator can run it."""
    from accelerate.utils import DistributedType

    if strategy == "deepspeed":
        return DeepSpeed(accelerator, schedule)
    if accelerator.distributed_type == DistributedType.FSDP:  # Accelerate shards (CUDA)
        return FSDP(accelerator, shard_itself=False)
    if strategy == "fsdp" and accelerator.num_processes > 1:  # Accelerate's CPU path would not: PyTorch's FSDP2
        return FSDP(accelerator, shard_itself=True)
    return Parallel(accelerator)


def written_by(checkpoint: Path) -> str:
    """The strategy whose state a checkpoint holds (its own directory inside, else plain weights: ddp)."""
    return next((s.name for s in (FSDP, DeepSpeed) if (checkpoint / s.state_dir).is_dir()), Parallel.name)
