"""One training loop for pretrain and finetune, on Accelerate.

Reads top to bottom: setup, then epochs of accumulation windows (forward, backward, step), with
evaluation, early stopping and checkpoints at their boundaries. The loop never asks which task it runs.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from sft_cli.config.schema import EngineConfig, LossConfig, OptimConfig, OutputConfig, ScheduleConfig
from sft_cli.data.streaming import stream_loader
from sft_cli.data.tables import batches_per_rank, epoch_batches, shard_batches
from sft_cli.engine.accelerator import estimate_flops_per_token
from sft_cli.engine.checkpointer import Checkpointer, SignalWatch
from sft_cli.engine.ema import WeightAverage
from sft_cli.engine.evaluation import evaluate_over_processes
from sft_cli.engine.meter import Meter
from sft_cli.engine.optim import build_optimizer, build_scheduler
from sft_cli.engine.parallel import for_training
from sft_cli.engine.summary import training_summary
from sft_cli.errors import SftError
from sft_cli.model import losses
from sft_cli.model.backbone import compile_blocks, count_parameters
from sft_cli.rundir.metrics_log import MetricLog
from sft_cli.tasks.base import Batch, Task
from sft_cli.ui.progress import TrainProgress

log = logging.getLogger("sft")


@dataclass
class TrainState:
    """Everything that says where training is; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    window_in_epoch: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    best_tie_breakers: Optional[list[float]] = None  # the task's next metrics at the best step (equal main metrics)
    bad_evals: int = 0
    skipped_nonfinite: int = 0
    last_loss: Optional[float] = None
    history: list[dict[str, Any]] = field(default_factory=list)
    tokens_per_source: dict[str, int] = field(default_factory=dict)  # a data.train mixture: tokens trained per source
    examples_per_source: dict[str, int] = field(default_factory=dict)


class Trainer:
    """Trains `task.model` on `task.train_set` with the recipe's schedule, optimizer and engine."""

    def __init__(
        self,
        task: Task,
        accelerator: Accelerator,
        schedule: ScheduleConfig,
        optim: OptimConfig,
        engine: EngineConfig,
        output: OutputConfig,
        loss: LossConfig,
        run_dir: Path,
        resume_command: str = "",
        trackers: Optional[Any] = None,
    ):
        self.task, self.accelerator = task, accelerator
        self.schedule, self.optim_config, self.engine, self.output = schedule, optim, engine, output
        self.weights = {"sup": loss.supervised, "lm": loss.lm, **task.loss_weights()}
        self.run_dir = run_dir
        self.resume_command = resume_command
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
        mirror = trackers.log if trackers is not None and accelerator.is_main_process else None
        self.log = MetricLog(run_dir / "metrics.jsonl", enabled=accelerator.is_main_process, mirror=mirror)
        self.state = TrainState()
        self.signals = SignalWatch()

    # -- setup ---------------------------------------------------------------------------------

    def setup(self, resume_from: Optional[Path]) -> None:
        """Seed, size the schedule, build optimizer and scheduler, place on device, maybe resume."""
        set_seed(self.engine.seed)
        self.total_steps, self.windows_per_epoch = self._schedule_length()
        model = self.task.model
        if self.engine.grad_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable()
        self.params = count_parameters(model)
        self.parallel = for_training(self.engine.distributed.strategy, self.accelerator, self.schedule)
        self.parallel.check_task(self.task.name, self.task.shardable)
        model = self.parallel.shard(model)  # before the optimizer, which then holds the shards
        self.optimizer = build_optimizer(model, self.optim_config, self.task.lr_scales())
        self.scheduler = build_scheduler(self.optimizer, self.schedule, self.total_steps, self.windows_per_epoch)
        self.model, self.optimizer = self.parallel.prepare(model, self.optimizer)
        self.task.length_buckets = self.engine.compile
        if self.engine.compile:
            self.model = compile_blocks(self.model)
        self.ema = WeightAverage(self.model, self.engine.ema_decay) if self.engine.ema else None
        self.checkpointer = Checkpointer(self.run_dir, self.accelerator, self.parallel, self.task, self.output.keep)
        self.checkpointer.bind(self.model, self.optimizer, self.scheduler, self.ema)
        self.flops_per_token = estimate_flops_per_token(self.model)
        if resume_from is not None:
            self._restore(resume_from)

    def _restore(self, checkpoint: Path) -> None:
        """Load model weights and trainer state so the run continues as if never stopped."""
        self.state = TrainState(**self.checkpointer.restore(checkpoint))
        if self.accelerator.process_index != 0:  # the saved per-source counts are every process's: rank 0 holds them
            self.state.tokens_per_source, self.state.examples_per_source = {}, {}
        self.log.truncate_after(self.state.step)
        log.info("resumed from %s at step %d", checkpoint, self.state.step)

    def save_model(self, directory: Path) -> None:
        """Atomically write a loadable model (gathered from the shards when the model is sharded; the EMA weights
        with engine.ema)."""
        with self._averaged():
            self.checkpointer.save_model(directory)

    def _averaged(self) -> Any:
        """The EMA weights in the model inside the block (engine.ema), else nothing changes."""
        return self.ema.applied(self.model) if self.ema is not None else nullcontext()

    def save_checkpoint(self) -> Path:
        """A checkpoint of everything (weights, optimizer, scheduler, RNG, data position); keeps `output.keep`."""
        return self.checkpointer.save(self._state_over_ranks())

    def _state_over_ranks(self) -> TrainState:
        """The state to save (rank 0's): a mixture's per-source counts summed over every process."""
        if self.task.mixture is None or self.accelerator.num_processes == 1:
            return self.state
        from accelerate.utils import gather_object

        ranks = gather_object([[self.state.tokens_per_source, self.state.examples_per_source]])
        total = [{k: sum(r[i].get(k, 0) for r in ranks) for k in ranks[0][i]} for i in (0, 1)]
        return replace(self.state, tokens_per_source=total[0], examples_per_source=total[1])

    def _schedule_length(self) -> tuple[int, int]:
        """(optimizer steps, steps per epoch): from the epochs, capped by max_steps and the max_tokens budget.

        A stream has no length: its run is max_steps / max_tokens long and counts as one epoch.
        """
        world, accum = self.accelerator.num_processes, self.schedule.grad_accum
        caps = [self.schedule.max_steps] if self.schedule.max_steps else []
        if self.schedule.max_tokens:
            per_step = (self.task.tokens_per_example or 0) * self.schedule.batch_size * world * accum
            if not per_step:
                raise SftError("schedule.max_tokens: this task's examples have no fixed length — use max_steps")
            caps.append(math.ceil(self.schedule.max_tokens / per_step))
        if self.task.streaming:
            total = min(caps)
            return total, total
        per_rank = batches_per_rank(self._epoch_examples(), self.schedule.batch_size, world)
        windows_per_epoch = max(1, math.ceil(per_rank / accum))
        if self.schedule.epochs:
            caps.append(math.ceil(self.schedule.epochs * windows_per_epoch))
        return min(caps), windows_per_epoch

    def _epoch_examples(self) -> int:
        """Examples in one epoch: the training table's rows, or a mixture's rows per epoch."""
        mixture = self.task.mixture
        return mixture.epoch_size if mixture is not None else len(self.task.train_set)

    # -- the loop ------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Run to the end of the schedule (or an early stop); returns the summary."""
        self.signals.install()
        self.progress = TrainProgress(self.total_steps, enabled=self.accelerator.is_main_process)
        self.progress.start(self.state.step)
        self.eval_every = 0 if self.schedule.eval_every == "epoch" else int(self.schedule.eval_every)
        self.meter = Meter()
        stop = False
        if self.task.eval_at_start and self.state.step == 0 and self.task.eval_set is not None:
            self._paused(self._evaluate_and_track)
        try:
            while not stop and self.state.step < self.total_steps:
                for window, indices in self._windows(self.state.epoch, self.state.window_in_epoch):
                    stop = self._step(window, indices)
                    if stop or self.state.step >= self.total_steps:
                        break
                if self.state.window_in_epoch >= self.windows_per_epoch:  # a whole epoch is done
                    self.state.epoch += 1
                    self.state.window_in_epoch = 0
                    if not self.eval_every and not stop:
                        stop = self._paused(self._evaluate_and_track)
                    self._paused(self.save_checkpoint)
            if self.meter.steps or self.meter.tokens:  # an early stop leaves a partial log window
                elapsed = self.meter.lap()
                self.state.train_seconds += elapsed
                self.progress.update(self.state.step, self._log_train())
            if self.task.eval_set is not None and self._last_eval_step() != self.state.step:
                self._paused(self._evaluate_and_track)
        finally:
            self.state.train_seconds += self.meter.lap()
            self.progress.stop()
            self.signals.restore()
        return self.summary()

    def _step(self, window: list[Batch], indices: Optional[list[list[int]]] = None) -> bool:
        """One optimizer step plus whatever falls due after it; True means stop early."""
        self._count_sources(window, indices)
        loss, parts, tokens = self._train_window(window)
        self.state.step += 1
        self.state.window_in_epoch += 1
        self.meter.add(loss, parts, tokens)
        if loss is None:
            self.state.skipped_nonfinite += 1
        if self.state.step % self.schedule.log_every == 0 or self.state.step == self.total_steps:
            elapsed = self.meter.lap()
            self.state.train_seconds += elapsed
            self.progress.update(self.state.step, self._log_train())
        stop = False
        if self.eval_every and self.state.step % self.eval_every == 0:
            stop = self._paused(self._evaluate_and_track)
        if self.output.save_every and self.state.step % self.output.save_every == 0:
            self._paused(self.save_checkpoint)
        if self.signals.signal is not None:
            raise self.signals.interrupted(self.save_checkpoint())
        return stop

    def _count_sources(self, window: list[Batch], indices: Optional[list[list[int]]]) -> None:
        """A mixture's tokens and examples per source (this process's share; summed over processes at the end)."""
        mixture = self.task.mixture
        if mixture is None:
            return
        if indices is not None:  # in-memory rows: their sources and lengths are known from the indices
            flat = np.asarray([i for batch in indices for i in batch], dtype=np.int64)
            tokens = self._example_tokens()[flat]
            sources = mixture.source_of(flat)
        else:  # a stream marks each row's source and tokens itself
            sources = np.concatenate([b.pop("mixture_source").numpy() for b in window])
            tokens = np.concatenate([b.pop("mixture_tokens").numpy() for b in window])
        for number, source in enumerate(mixture.sources):
            chosen = sources == number
            self.state.examples_per_source[source.key] = self.state.examples_per_source.get(source.key, 0) + int(
                chosen.sum()
            )
            self.state.tokens_per_source[source.key] = self.state.tokens_per_source.get(source.key, 0) + int(
                tokens[chosen].sum()
            )

    def _example_tokens(self) -> np.ndarray:
        """Tokens of each training example (read once: a column of a large table is slow to convert)."""
        if getattr(self, "_tokens_of", None) is None:
            lengths = self.task.lengths("train")
            fixed = self.task.tokens_per_example or 0  # packed blocks: every example the same length
            count = len(self.task.train_set)
            self._tokens_of = np.asarray(lengths) if lengths is not None else np.full(count, fixed, dtype=np.int64)
        return self._tokens_of

    def _paused(self, action: Callable[[], Any]) -> Any:
        """Run eval or saving without counting it as training time."""
        self.state.train_seconds += self.meter.lap()
        try:
            return action()
        finally:
            self.meter.restart()

    def _last_eval_step(self) -> Optional[int]:
        return self.state.history[-1]["step"] if self.state.history else None

    def _windows(self, epoch: int, skip: int):
        """This process's accumulation windows for an epoch, skipping those already done."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        accum = self.schedule.grad_accum
        if self.task.streaming:  # one endless stream; the position is the batches already trained
            stream = self.task.train_stream(rank, world, self.schedule.batch_size, skip * accum)
            iterator = iter(stream_loader(stream, self.engine.num_workers))
            while True:
                yield [next(iterator) for _ in range(accum)], None
        mixture = self.task.mixture
        batches = epoch_batches(
            self.task.lengths("train"),
            self._epoch_examples(),
            self.schedule.batch_size,
            self.engine.seed,
            epoch,
            self.task.groups_by_length(self.schedule.group_by_length),
            mixture.epoch_indices(epoch) if mixture is not None else None,
        )
        mine = shard_batches(batches, world)[rank]  # as many batches on every rank, each example once
        windows = [mine[i : i + accum] for i in range(0, len(mine), accum)][skip:]
        loader = DataLoader(
            self.task.train_set,
            batch_sampler=[b for w in windows for b in w],
            collate_fn=lambda rows: self.task.collate(rows, train=True),
            num_workers=self.engine.num_workers,
            pin_memory=self.accelerator.device.type == "cuda",
            generator=torch.Generator(),  # else each new iterator draws its seed from the global RNG, breaking exact resume
        )
        iterator = iter(loader)
        for window in windows:
            yield [next(iterator) for _ in window], window

    def _train_window(self, window: list[Batch]) -> tuple[Optional[torch.Tensor], dict[str, torch.Tensor], int]:
        """Forward/backward over one accumulation window, then one optimizer step."""
        device = self.accelerator.device
        window = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in window]
        counts: dict[str, torch.Tensor] = {}
        for batch in window:
            for name, count in self.task.counts(batch).items():
                counts[name] = counts.get(name, 0) + count.to(device)
        world = self.accelerator.num_processes
        if world > 1:  # every rank normalizes by the global item count; DDP then averages gradients
            counts = {k: self.accelerator.reduce(v.float(), reduction="sum") for k, v in counts.items()}
        total_loss = torch.zeros((), device=device)
        parts_sum: dict[str, torch.Tensor] = {}
        tokens = 0
        self.model.train()
        for index, batch in enumerate(window):
            sync = index == len(window) - 1
            with self.accelerator.no_sync(self.model) if not sync else nullcontext():
                with self.accelerator.autocast():
                    terms = self.task.loss_terms(self.model, batch)
                loss, parts = losses.mix(terms, counts, self.weights, scale=world)
                self.parallel.backward(self.model, loss, boundary=sync)
            total_loss += loss.detach() / world
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0) + v  # already over the global count: ranks sum to the mean
            tokens += self.task.tokens(batch)
        if not self._finite(total_loss):
            self.optimizer.zero_grad(set_to_none=True)
            return None, {}, tokens
        self.parallel.step(self.model, self.optimizer, self.schedule.max_grad_norm)
        if self.ema is not None:
            self.ema.update(self.model)
        if not isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total_loss, {k: v for k, v in parts_sum.items()}, tokens

    def _finite(self, loss: torch.Tensor) -> bool:
        """Check the loss; stop (or skip, when allowed) on NaN/inf, naming the step."""
        if bool(torch.isfinite(loss)):
            return True
        if self.engine.skip_nonfinite:
            log.warning("non-finite loss at step %d: batch skipped", self.state.step + 1)
            return False
        raise SftError(
            f"loss became {loss.item()} at step {self.state.step + 1} — lower optim.lr, check the data, or set "
            "engine.skip_nonfinite: true; the last checkpoint is intact"
        )

    def _log_train(self) -> dict[str, Any]:
        """Write a train record (the only place the loop syncs the loss to the host)."""
        record: dict[str, Any] = {"step": self.state.step, "epoch": round(self.epoch_progress(), 4)}
        if self.accelerator.num_processes > 1:  # one collective per log line: every rank's share of loss and tokens
            self.meter.reduce(self.accelerator)
        self.state.tokens += self.meter.tokens
        record.update(self.meter.means())
        if "loss" in record:
            self.state.last_loss = record["loss"]
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        record["tokens_per_s"] = self.meter.tokens / max(self.meter.seconds, 1e-9)
        if self.state.skipped_nonfinite:
            record["skipped_nonfinite"] = self.state.skipped_nonfinite
        self.meter.reset()
        self.log.write(record)
        return record

    def epoch_progress(self) -> float:
        """Epochs done so far, fractional within the current one."""
        return self.state.epoch + self.state.window_in_epoch / self.windows_per_epoch

    # -- evaluation, best model, early stopping ------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        """Task metrics on the eval split, sharded over processes and gathered exactly once each."""
        if self.task.eval_set is None:
            return {}
        with self._averaged():
            metrics = evaluate_over_processes(
                self.task, self.model, self.accelerator, self.schedule.batch_size, False, self.parallel
            )
        if self.accelerator.is_main_process:
            self.task.write_eval_artifacts(self.run_dir, self.state.step)
        return metrics

    def _evaluate_and_track(self) -> bool:
        """Evaluate, log, keep the best model, feed plateau/early stopping; True means stop."""
        metrics = self.evaluate()
        if not metrics:
            return False
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        record = {
            "step": self.state.step,
            "epoch": round(self.epoch_progress(), 4),
            **{f"eval_{k}" if not k.startswith("eval_") else k: v for k, v in scalars.items()},
        }
        self.log.write(record)
        self.state.history.append(record)
        es = self.schedule.early_stopping
        name = es.metric if es else self.task.main_metric
        mode = es.mode if es else self.task.main_mode
        value = record.get(name, record.get(f"eval_{name}"))
        if value is None:
            raise SftError(
                f"schedule.early_stopping.metric: '{name}' is not logged; choose one of {', '.join(k for k in record if k.startswith('eval_'))}"
            )
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(value if mode == "min" else -value)
        best = self.state.best_metric
        improved = best is None or (value < best if mode == "min" else value > best)
        after = [record.get(name) for name in self.task.tie_breakers] if not es else []
        after = after if after and None not in after else None
        if not improved and value == best and after is not None and self.state.best_tie_breakers is not None:
            improved = after < self.state.best_tie_breakers if mode == "min" else after > self.state.best_tie_breakers
        if improved:
            self.state.best_metric, self.state.best_step, self.state.bad_evals = value, self.state.step, 0
            self.state.best_tie_breakers = after
            if self.output.keep_best:
                self.save_model(self.run_dir / "best-model")
        else:
            self.state.bad_evals += 1
        return bool(es and self.state.bad_evals >= es.patience)

    def summary(self) -> dict[str, Any]:
        """What summary.json records about the training run."""
        return training_summary(self)
