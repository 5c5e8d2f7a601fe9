"""Checkpoints, the final model and signals for the training loop (a mixin of `engine.Trainer`).

A checkpoint holds the model weights, optimizer, scheduler, gradient scaler, RNG states and the data
position (TrainState), written atomically; Ctrl-C / SIGTERM saves one and stops with 130 / 143.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

from sft_cli.backbone import unwrap
from sft_cli.checkpoint import (
    atomic_directory,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    untie_shared,
)
from sft_cli.errors import SftError

log = logging.getLogger("sft")


class Interrupted(Exception):
    """Raised after a signal: a checkpoint was saved; carries the exit code (130 or 143)."""

    def __init__(self, code: int, checkpoint: Path):
        super().__init__(f"interrupted; checkpoint saved at {checkpoint}")
        self.code = code
        self.checkpoint = checkpoint


class CheckpointingMixin:
    """Saving and restoring a Trainer's whole state; expects the Trainer's attributes (model, optimizer, ...)."""

    accelerator: Any
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
        from safetensors.torch import load_file

        weights = load_file(str(checkpoint / "model" / "weights.safetensors"))
        unwrap(self.model).load_state_dict(weights, strict=True)
        saved = load_trainer_state(checkpoint)
        world = saved.get("num_processes", 1)
        if world != self.accelerator.num_processes:
            raise SftError(
                f"--resume: {checkpoint.name} was written by {world} process(es) and this run has "
                f"{self.accelerator.num_processes}; the data position is per process — resume with --nproc {world}"
            )
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if saved.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"])
        self.state = type(self.state)(**saved["train_state"])
        self.log.truncate_after(self.state.step)
        log.info("resumed from %s at step %d", checkpoint, self.state.step)

    # -- saving --------------------------------------------------------------------------------

    def save_model(self, directory: Path) -> None:
        """Atomically write a loadable model (rank 0 only)."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            with atomic_directory(directory) as tmp:
                self.task.save(unwrap(self.accelerator.unwrap_model(self.model)), tmp)
        self.accelerator.wait_for_everyone()

    def save_checkpoint(self) -> Path:
        """Model weights + optimizer/scheduler/scaler/RNG/progress, atomically; keeps `output.keep`."""
        from safetensors.torch import save_file

        directory = self.run_dir / "checkpoints"
        self.accelerator.wait_for_everyone()
        state_dict = unwrap(self.accelerator.unwrap_model(self.model)).state_dict()
        path = directory / f"step-{self.state.step:08d}"
        if self.accelerator.is_main_process:
            trainer_state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler else None,
                "rng": rng_state(),
                "train_state": self.state.__dict__.copy(),
                # the data position (epoch, window_in_epoch) is per rank: it holds at this world size only
                "num_processes": self.accelerator.num_processes,
            }

            def write_model(target: Path) -> None:
                target.mkdir(parents=True)
                tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
                save_file(untie_shared(tensors), str(target / "weights.safetensors"))

            path = save_checkpoint(directory, self.state.step, trainer_state, write_model, self.output.keep)
        self.accelerator.wait_for_everyone()
        return path

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
