"""The parallelism interface the training loop, evaluation and the checkpointer call, and its plainest strategy.

`Parallel` is data parallelism as Accelerate does it (DDP over several processes, or one process): every rank
holds the whole model, so a checkpoint's weights are one file rank 0 writes. `Sharded` is the common part of
the strategies that split parameters or optimizer state over ranks (FSDP2, DeepSpeed): every rank writes its
own share of a checkpoint into one shared directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

import torch
import torch.distributed as dist
from torch import nn

from sft_cli.errors import SftError
from sft_cli.model.backbone import unwrap
from sft_cli.rundir.atomic import replace_directory
from sft_cli.rundir.checkpoints import checkpoint_dir, mark_complete, save_checkpoint, untie_shared

#: what a checkpoint's trainer state holds besides the weights (the rank-0 part every strategy writes)
TrainerState = Callable[[bool], dict[str, Any]]


class Parallel:
    """Data parallel (or a single process): the whole model on every rank."""

    #: how checkpoints written by this strategy are told apart (`--resume` refuses a mismatch)
    name = "ddp"
    #: the directory inside checkpoints/step-N that holds this strategy's own state (None: plain weights)
    state_dir: Optional[str] = None

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator

    # -- training --------------------------------------------------------------------------------

    #: parameters split over ranks (FSDP, ZeRO-3): every rank must run each forward, so free decoding cannot
    shards_parameters = False
    #: what else the user could set when a task cannot run sharded
    lighter_setting = ""

    def check_task(self, task_name: str, shardable: bool) -> None:
        """Refuse, before any compute, a task whose evaluation cannot run with the parameters sharded."""
        if self.shards_parameters and self.accelerator.num_processes > 1 and not shardable:
            raise SftError(
                f"engine.distributed.strategy: {self.name} shards the parameters and does not run task "
                f"{task_name} yet (its decoding is not synchronized across shards) — use strategy: ddp"
                + self.lighter_setting
            )

    def shard(self, model: nn.Module) -> nn.Module:
        """Split the model over ranks before its optimizer is built (where no wrapper does it in `prepare`)."""
        return model

    def prepare(self, model: nn.Module, optimizer: Any) -> tuple[nn.Module, Any]:
        """Wrap the model and its optimizer for this strategy."""
        return self.accelerator.prepare(model, optimizer)

    def collective_forwards(self, model: nn.Module) -> bool:
        """True when every rank must take part in each forward (parameters sharded over ranks)."""
        return False

    def backward(self, model: nn.Module, loss: torch.Tensor, boundary: bool) -> None:
        """Backward for one micro-batch; `boundary` marks the accumulation window's last one."""
        self.accelerator.backward(loss)

    def step(self, model: nn.Module, optimizer: Any, max_grad_norm: Optional[float]) -> None:
        """Clip (when asked) and take the optimizer step at the end of a window."""
        if max_grad_norm:
            self.accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()

    def eval_mode(self) -> ContextManager[Any]:
        """No autograd during evaluation (inference mode where the strategy keeps no state across calls)."""
        return torch.inference_mode()

    # -- weights and checkpoints -------------------------------------------------------------------

    def full_state_dict(self, model: nn.Module) -> Optional[dict[str, torch.Tensor]]:
        """The whole model's weights gathered on rank 0 (a collective), or None when the model holds them whole."""
        return None

    def write_checkpoint(
        self, directory: Path, step: int, model: nn.Module, optimizer: Any, trainer_state: TrainerState
    ) -> Path:
        """Rank 0 writes the weights and the trainer state (optimizer included) as checkpoints/step-N, atomically."""
        from safetensors.torch import save_file

        state_dict = unwrap(self.accelerator.unwrap_model(model)).state_dict()
        if self.accelerator.is_main_process:

            def write_model(target: Path) -> None:
                target.mkdir(parents=True)
                tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
                save_file(untie_shared(tensors), str(target / "weights.safetensors"))

            return save_checkpoint(directory, step, trainer_state(True), write_model)
        return checkpoint_dir(directory, step)

    def read_checkpoint(self, checkpoint: Path, model: nn.Module, optimizer: Any, saved: dict[str, Any]) -> None:
        """Load the weights and optimizer state a checkpoint of this strategy holds."""
        from safetensors.torch import load_file

        weights = load_file(str(checkpoint / "model" / "weights.safetensors"))
        unwrap(model).load_state_dict(weights, strict=True)
        optimizer.load_state_dict(saved["optimizer"])


class Sharded(Parallel):
    """A strategy whose ranks each hold a share of the state: every rank writes its share of a checkpoint."""

    def eval_mode(self) -> ContextManager[Any]:
        # FSDP2 / DeepSpeed keep buffers across calls: tensors made under inference_mode would poison training
        return torch.no_grad()

    def save_shards(self, directory: Path, model: nn.Module, optimizer: Any) -> None:
        """Write this rank's share of the model and optimizer state under `directory` (a collective)."""
        raise NotImplementedError

    def write_checkpoint(
        self, directory: Path, step: int, model: nn.Module, optimizer: Any, trainer_state: TrainerState
    ) -> Path:
        """Every rank writes its shard (nothing gathered); rank 0 the trainer state, then publishes atomically."""
        final = checkpoint_dir(directory, step)
        tmp = shared_tmp_dir(final, self.accelerator.is_main_process)
        self.save_shards(tmp, model, optimizer)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            torch.save(trainer_state(False), tmp / "trainer_state.pt")
            mark_complete(tmp, step, sharded=True)
            replace_directory(tmp, final)
        return final


def shared_tmp_dir(final: Path, is_main: bool) -> Path:
    """A temporary directory beside `final` that every rank writes into (rank 0 makes it; all wait)."""
    tmp = final.with_name(f".tmp-{final.name}-sharded")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    return tmp
