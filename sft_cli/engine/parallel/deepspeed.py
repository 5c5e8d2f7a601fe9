"""`engine.distributed.strategy: deepspeed`: ZeRO 1/2/3 through Accelerate's DeepSpeed plugin.

DeepSpeed owns three things the training loop otherwise does itself: the optimizer step (taken inside
backward at the accumulation boundary, with its gradient clipping), the optimizer state (partitioned over
ranks, so checkpoints are DeepSpeed's own, one optimizer file per rank) and, under ZeRO-3, the weights
(gathered once for the final model). The `DeepSpeed` strategy calls the functions here at those points for
the loop. It runs on CUDA, and off CUDA on DeepSpeed's CPU accelerator over gloo.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from sft_cli.config.validation import recipe_owned_values
from sft_cli.engine.parallel.base import Sharded
from sft_cli.errors import SftError
from sft_cli.model.backbone import keyed_like_unwrapped

ENGINE_DIR = "deepspeed"  # inside checkpoints/step-N/: DeepSpeed's checkpoint (model + one optimizer file per rank)
TAG = "state"


class DeepSpeed(Sharded):
    """ZeRO 1/2/3: DeepSpeed steps inside backward, partitions the optimizer state and, at stage 3, the weights."""

    name = "deepspeed"
    state_dir = ENGINE_DIR
    lighter_setting = " or zero_stage: 2"

    def __init__(self, accelerator: Any, schedule: Any):
        super().__init__(accelerator)
        self.schedule = schedule
        self.shards_parameters = accelerator.state.deepspeed_plugin.zero_stage == 3

    def shard(self, model: nn.Module) -> nn.Module:
        configure(self.accelerator, self.schedule)  # DeepSpeed sizes its batches from the config; the loop feeds them
        return model

    def collective_forwards(self, model: nn.Module) -> bool:
        return zero3(model)

    def backward(self, model: nn.Module, loss: torch.Tensor, boundary: bool) -> None:
        backward(model, loss, boundary)  # steps (and clips) at the window's end: `step` then finds nothing to do

    def full_state_dict(self, model: nn.Module) -> Optional[dict[str, torch.Tensor]]:
        return full_state_dict(self.accelerator, model) if zero3(model) else None

    def save_shards(self, directory: Path, model: nn.Module, optimizer: Any) -> None:
        save(directory, model)

    def read_checkpoint(self, checkpoint: Path, model: nn.Module, optimizer: Any, saved: dict[str, Any]) -> None:
        load(checkpoint, model)


def accelerator_kwargs(distributed: Any, device: str) -> dict[str, Any]:
    """Accelerator arguments for DeepSpeed: its plugin, plus a gloo process group when there is no CUDA.

    Accelerate forms DeepSpeed's group only on its accelerator path and, with no accelerator found, leaves the
    backend unset so every process believes it is rank 0; naming gloo makes the group real on CPU.
    """
    require_deepspeed()
    from accelerate import DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs

    if torch.cuda.is_available() and device == "cpu":
        raise SftError(
            "engine.device: cpu with strategy deepspeed on a CUDA machine — DeepSpeed takes the GPU; "
            "use device: auto or cuda, or strategy: ddp"
        )
    if device == "mps":
        raise SftError("engine.device: mps — DeepSpeed runs on CUDA or CPU; use device: auto or cpu")
    set_launcher_environment()
    _forget_stale_groups()
    if distributed.deepspeed_config:
        plugin = DeepSpeedPlugin(hf_ds_config=str(Path(distributed.deepspeed_config).expanduser()))
    else:
        plugin = DeepSpeedPlugin(zero_stage=distributed.zero_stage, zero3_save_16bit_model=True)
    kwargs: dict[str, Any] = {"deepspeed_plugin": plugin}
    if not torch.cuda.is_available():
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    return kwargs


def require_deepspeed() -> None:
    """The optional extra must be installed; otherwise one line saying how."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise SftError(
            "engine.distributed.strategy: deepspeed needs the DeepSpeed package — pip install 'sft[deepspeed]'"
        ) from None


_SET_HERE: list[str] = []  # launcher variables this process set for itself (undone before a later non-DeepSpeed run)


def set_launcher_environment() -> None:
    """A run without a launcher is a world of one, but Accelerate's DeepSpeed path and DeepSpeed itself read the
    launcher's variables (LOCAL_RANK, ...): set them for this process as torchrun would."""
    if "LOCAL_RANK" in os.environ:
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    world_of_one = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for name, value in {**world_of_one, "MASTER_PORT": str(port)}.items():
        if name not in os.environ:
            os.environ[name] = value
            _SET_HERE.append(name)


def _forget_stale_groups() -> None:
    """DeepSpeed caches process groups in module globals; an earlier run in this process ended its group
    (Accelerate's end_training), so those caches point at a destroyed group: clear them for the new one."""
    import sys

    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None or torch.distributed.is_initialized():
        return
    for name, value in vars(groups).copy().items():
        if name.startswith("_") and name.isupper() and name.endswith(("_GROUP", "_GROUP_RANKS")):
            setattr(groups, name, {} if isinstance(value, dict) else None)
    groups.mpu = None
    groups.mesh_device = None


def forget_earlier_runs() -> None:
    """Before a run without DeepSpeed, undo what a DeepSpeed run earlier in this process (sft check, sweeps) left:
    the launcher variables it set, and transformers' ZeRO-3 flag (which would build models partitioned)."""
    for name in _SET_HERE:
        os.environ.pop(name, None)
    _SET_HERE.clear()
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def configure(accelerator: Any, schedule: Any) -> None:
    """Fill the DeepSpeed config from the schedule before `prepare` (the loop feeds batches itself)."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config.update(recipe_owned_values(schedule))
    config["train_batch_size"] = schedule.batch_size * schedule.grad_accum * accelerator.num_processes
    config.setdefault("steps_per_print", 10**9)  # progress is sft's to report
    accelerator.gradient_accumulation_steps = schedule.grad_accum


def is_deepspeed(model: nn.Module) -> bool:
    """True for a model `prepare` wrapped in a DeepSpeedEngine."""
    return type(model).__name__ == "DeepSpeedEngine"


def zero3(model: nn.Module) -> bool:
    """ZeRO-3: parameters are partitioned, so forwards are collective (every rank must take part)."""
    return is_deepspeed(model) and model.zero_optimization_stage() == 3


def backward(model: Any, loss: torch.Tensor, boundary: bool) -> None:
    """Backward through DeepSpeed; at the window's last micro-batch it also clips and steps the optimizer.

    The loss is already normalized over the whole window (and ranks), so DeepSpeed must not divide it again.
    """
    model.set_gradient_accumulation_boundary(boundary)
    model.backward(loss, scale_wrt_gas=False)
    if boundary:
        model.step()


def save(directory: Path, model: Any) -> None:
    """Every rank writes its partition of the optimizer state; rank 0 the module (a collective)."""
    model.save_checkpoint(str(directory / ENGINE_DIR), tag=TAG, save_latest=False)


def load(checkpoint: Path, model: Any) -> None:
    """Read the weights and this rank's optimizer partition back (the same world size wrote them)."""
    path, _ = model.load_checkpoint(str(checkpoint / ENGINE_DIR), tag=TAG, load_lr_scheduler_states=False)
    if path is None:
        raise SftError(f"--resume: {checkpoint} has no readable DeepSpeed state — resume from an earlier checkpoint")


def full_state_dict(accelerator: Any, model: Any) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0 with `unwrap(model)`'s keys (ZeRO-3 gathers: every rank calls it)."""
    return keyed_like_unwrapped(accelerator.get_state_dict(model) or {}, model.module)
