"""Checkpoints, the final model and signals for the training loop (a mixin of `engine.Trainer`).

A checkpoint holds the model weights, optimizer, scheduler, gradient scaler, RNG states and the data
position (TrainState), written atomically; Ctrl-C / SIGTERM saves one and stops with 130 / 143.
"""

from __future__ import annotations

import logging
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from sft_cli import manifest, zero
from sft_cli.backbone import unwrap
from sft_cli.checkpoint import (
    atomic_directory,
    load_trainer_state,
    mark_complete,
    prune_checkpoints,
    replace_directory,
    rng_state,
    save_checkpoint,
    set_rng_state,
    untie_shared,
)
from sft_cli.errors import SftError
from sft_cli.fsdp import (
    SHARDED_DIR,
    full_state_dict,
    is_sharded,
    load_sharded,
    save_sharded,
    shared_tmp_dir,
)

log = logging.getLogger("sft")


def _readable(checkpoint: Path, load: Callable[[], Any]) -> Any:
    """Run a checkpoint load; a damaged or foreign file is a one-line error naming the checkpoint, not a crash."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: named, or it escapes

    try:
        return load()
    except SftError:
        raise
    except (Exception, CheckpointException) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = lines[-1][:200] if lines else type(err).__name__  # DCP's message ends with the real error
        raise SftError(
            f"--resume: {checkpoint} cannot be loaded ({type(err).__name__}: {detail}) — resume from another "
            "checkpoint (--resume PATH) or start over with --overwrite"
        ) from None


class Stopped(BaseException):
    """SIGINT / SIGTERM before the training loop could save a checkpoint (during set-up); carries the exit code."""

    def __init__(self, signum: int):
        self.name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.name}")
        self.code = 130 if signum == signal.SIGINT else 143


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Until the loop installs its own handlers: SIGINT / SIGTERM raise Stopped, so the run can clean up."""

    def stop(signum: int, _frame: Any) -> None:
        raise Stopped(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, stop)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Interrupted(Exception):
    """Raised after a signal: a checkpoint was saved; carries the exit code (130 or 143)."""

    def __init__(self, code: int, checkpoint: Path):
        super().__init__(f"interrupted; checkpoint saved at {checkpoint}")
        self.code = code
        self.checkpoint = checkpoint


class CheckpointingMixin:
    """Saving and restoring a Trainer's whole state; expects the Trainer's attributes (model, optimizer, ...)."""

    accelerator: Any
    engine: Any
    model: Any
    optimizer: Any
    scheduler: Any
    task: Any
    output: Any
    run_dir: Path
    state: Any
    log: Any
    _signal: Any

    def _restore(self, checkpoint: Path) -> None:
        """Load model weights and trainer state so the run continues as if never stopped."""
        saved = _readable(checkpoint, lambda: load_trainer_state(checkpoint))
        world = saved.get("num_processes", 1)
        if world != self.accelerator.num_processes:
            raise SftError(
                f"--resume: {checkpoint.name} was written by {world} process(es) and this run has "
                f"{self.accelerator.num_processes}; the data position is per process — resume with --nproc {world}"
            )
        written_by = next(
            (n for n, d in (("fsdp", SHARDED_DIR), ("deepspeed", zero.ENGINE_DIR)) if (checkpoint / d).is_dir()), "ddp"
        )
        running = "deepspeed" if zero.is_deepspeed(self.model) else "fsdp" if is_sharded(self.model) else "ddp"
        if written_by != running:
            raise SftError(
                f"--resume: {checkpoint.name} holds {written_by} state and this run trains with {running} — resume "
                f"with the engine.distributed.strategy and --nproc that wrote it"
            )
        _readable(checkpoint, lambda: self._load_state(checkpoint, written_by, saved))
        self.state = type(self.state)(**saved["train_state"])
        self.log.truncate_after(self.state.step)
        log.info("resumed from %s at step %d", checkpoint, self.state.step)

    def _load_state(self, checkpoint: Path, written_by: str, saved: dict[str, Any]) -> None:
        from safetensors.torch import load_file

        if written_by == "fsdp":
            load_sharded(checkpoint, self.model, self.optimizer)
        elif written_by == "deepspeed":
            zero.load(checkpoint, self.model)
        else:
            weights = load_file(str(checkpoint / "model" / "weights.safetensors"))
            unwrap(self.model).load_state_dict(weights, strict=True)
            self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if saved.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"])

    # -- saving --------------------------------------------------------------------------------

    def save_model(self, directory: Path) -> None:
        """Atomically write a loadable model (rank 0; a sharded model is gathered first, by every rank)."""
        self.accelerator.wait_for_everyone()
        gathered = None
        if is_sharded(self.model):
            gathered = full_state_dict(self.model)
        elif zero.zero3(self.model):
            gathered = zero.full_state_dict(self.accelerator, self.model)
        if self.accelerator.is_main_process:
            with atomic_directory(directory) as tmp:
                self.task.save(unwrap(self.accelerator.unwrap_model(self.model)), tmp, gathered)
            manifest.record(self.run_dir, directory)
        self.accelerator.wait_for_everyone()

    def save_checkpoint(self) -> Path:
        """Model weights + optimizer/scheduler/scaler/RNG/progress, atomically; keeps `output.keep`."""
        from safetensors.torch import save_file

        directory = self.run_dir / "checkpoints"
        self.accelerator.wait_for_everyone()
        if is_sharded(self.model) or zero.is_deepspeed(self.model):
            return self._save_sharded_checkpoint(directory)
        state_dict = unwrap(self.accelerator.unwrap_model(self.model)).state_dict()
        path = directory / f"step-{self.state.step:08d}"
        if self.accelerator.is_main_process:
            trainer_state = self._trainer_state()

            def write_model(target: Path) -> None:
                target.mkdir(parents=True)
                tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
                save_file(untie_shared(tensors), str(target / "weights.safetensors"))

            path = save_checkpoint(directory, self.state.step, trainer_state, write_model)
            self._published(path)
        self.accelerator.wait_for_everyone()
        return path

    def _published(self, checkpoint: Path) -> None:
        """Record a new checkpoint in the run's manifest and rotate out the oldest beyond `output.keep`."""
        manifest.record(self.run_dir, checkpoint)
        removed = prune_checkpoints(checkpoint.parent, self.output.keep)
        if removed:
            manifest.forget(self.run_dir, *removed)

    def _trainer_state(self, with_optimizer: bool = True) -> dict[str, Any]:
        return {
            **({"optimizer": self.optimizer.state_dict()} if with_optimizer else {}),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler else None,
            "rng": rng_state(),
            "train_state": self.state.__dict__.copy(),
            # the data position (epoch, window_in_epoch) is per rank: it holds at this world size only
            "num_processes": self.accelerator.num_processes,
        }

    def _save_sharded_checkpoint(self, directory: Path) -> Path:
        """FSDP2 / DeepSpeed: every rank writes its shard of the state (nothing gathered); rank 0 the rest."""
        final = directory / f"step-{self.state.step:08d}"
        tmp = shared_tmp_dir(final, self.accelerator.is_main_process)
        if zero.is_deepspeed(self.model):
            zero.save(tmp, self.model)
        else:
            save_sharded(tmp, self.model, self.optimizer)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            torch.save(self._trainer_state(with_optimizer=False), tmp / "trainer_state.pt")
            mark_complete(tmp, self.state.step, sharded=True)
            replace_directory(tmp, final)
            self._published(final)
        self.accelerator.wait_for_everyone()
        return final

    # -- signals -------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self._signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._signal = signum

    def _interrupt(self) -> Interrupted:
        path = self.save_checkpoint()
        code = 130 if self._signal == signal.SIGINT else 143
        return Interrupted(code, path)
