"""Checkpoints, the final model and signals for the training loop (the `Checkpointer` a `Trainer` holds).

A checkpoint holds the model weights, optimizer, scheduler, gradient scaler, RNG states and the data
position (TrainState), written atomically; Ctrl-C / SIGTERM saves one and stops with 130 / 143.
"""

from __future__ import annotations

import logging
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from sft_cli.engine.parallel import Parallel, written_by
from sft_cli.errors import SftError
from sft_cli.model.backbone import unwrap
from sft_cli.rundir import manifest
from sft_cli.rundir.atomic import atomic_directory
from sft_cli.rundir.checkpoints import load_trainer_state, prune_checkpoints, rng_state, set_rng_state

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


class Checkpointer:
    """Saves and restores a training run's whole state and writes its models, through the run's parallelism."""

    def __init__(self, run_dir: Path, accelerator: Any, parallel: Parallel, task: Any, keep: int):
        self.run_dir, self.accelerator, self.parallel, self.task, self.keep = run_dir, accelerator, parallel, task, keep
        self.model: Any = None
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.ema: Any = None

    def bind(self, model: Any, optimizer: Any, scheduler: Any, ema: Any = None) -> None:
        """What is saved: the prepared model, its optimizer and scheduler (and the weights' EMA, engine.ema)."""
        self.model, self.optimizer, self.scheduler, self.ema = model, optimizer, scheduler, ema

    def restore(self, checkpoint: Path) -> dict[str, Any]:
        """Load model weights and optimizer/scheduler/scaler/RNG; returns the saved TrainState fields."""
        saved = _readable(checkpoint, lambda: load_trainer_state(checkpoint))
        world = saved.get("num_processes", 1)
        if world != self.accelerator.num_processes:
            raise SftError(
                f"--resume: {checkpoint.name} was written by {world} process(es) and this run has "
                f"{self.accelerator.num_processes}; the data position is per process — resume with --nproc {world}"
            )
        holds, running = written_by(checkpoint), self.parallel.name
        if holds != running:
            raise SftError(
                f"--resume: {checkpoint.name} holds {holds} state and this run trains with {running} — resume "
                f"with the engine.distributed.strategy and --nproc that wrote it"
            )
        _readable(checkpoint, lambda: self._load_state(checkpoint, saved))
        return saved["train_state"]

    def _load_state(self, checkpoint: Path, saved: dict[str, Any]) -> None:
        self.parallel.read_checkpoint(checkpoint, self.model, self.optimizer, saved)
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.ema is not None:
            if saved.get("ema") is None:
                raise SftError(
                    f"--resume: {checkpoint.name} has no EMA weights (engine.ema was off) — resume with engine.ema: false"
                )
            self.ema.load_state_dict(saved["ema"])
        if saved.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"])

    def save_model(self, directory: Path) -> None:
        """Atomically write a loadable model (rank 0; a sharded model is gathered first, by every rank)."""
        self.accelerator.wait_for_everyone()
        gathered = self.parallel.full_state_dict(self.model)
        if self.accelerator.is_main_process:
            with atomic_directory(directory) as tmp:
                self.task.save(unwrap(self.accelerator.unwrap_model(self.model)), tmp, gathered)
            manifest.record(self.run_dir, directory)
        self.accelerator.wait_for_everyone()

    def save(self, state: Any) -> Path:
        """Model weights + optimizer/scheduler/scaler/RNG/progress (`state`), atomically; keeps `output.keep`."""
        self.accelerator.wait_for_everyone()
        path = self.parallel.write_checkpoint(
            self.run_dir / "checkpoints",
            state.step,
            self.model,
            self.optimizer,
            lambda with_optimizer: self._trainer_state(state, with_optimizer),
        )
        if self.accelerator.is_main_process:
            manifest.record(self.run_dir, path)
            removed = prune_checkpoints(path.parent, self.keep)
            if removed:
                manifest.forget(self.run_dir, *removed)
        self.accelerator.wait_for_everyone()
        return path

    def _trainer_state(self, state: Any, with_optimizer: bool) -> dict[str, Any]:
        return {
            **({"optimizer": self.optimizer.state_dict()} if with_optimizer else {}),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler else None,
            "rng": rng_state(),
            "train_state": state.__dict__.copy(),
            # the data position (epoch, window_in_epoch) is per rank: it holds at this world size only
            "num_processes": self.accelerator.num_processes,
        }


class SignalWatch:
    """Ctrl-C / SIGTERM during training: remembered, so the loop saves a checkpoint at the next step and stops."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def interrupted(self, checkpoint: Path) -> Interrupted:
        """The exception that ends the run once `checkpoint` is saved (exit 130 for SIGINT, 143 for SIGTERM)."""
        return Interrupted(130 if self.signal == signal.SIGINT else 143, checkpoint)
