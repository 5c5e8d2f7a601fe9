"""What each CLI command does, as plain functions over a typed Recipe (no YAML, no Typer here).

A run directory holds: recipe.yaml, metrics.jsonl, checkpoints/, best-model/, model/, summary.json,
and after `sft eval`, eval.json (+ plots).
"""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

from accelerate.utils import gather_object, set_seed

from sft_cli.commands.model_card import write_card
from sft_cli.commands.prepare import tokenize_once
from sft_cli.commands.runs import write_status
from sft_cli.config.recipe import Recipe, to_dict, to_yaml
from sft_cli.data.tables import tokenizing_stats
from sft_cli.engine.accelerator import make_accelerator
from sft_cli.engine.checkpointer import Interrupted, Stopped, stop_on_signals
from sft_cli.engine.evaluation import evaluate_over_processes
from sft_cli.engine.tracking import Trackers
from sft_cli.engine.trainer import Trainer
from sft_cli.errors import SftError, StorageError, is_storage_error, storage_message
from sft_cli.model.memory import limit_heap_retention
from sft_cli.rundir import manifest
from sft_cli.rundir.atomic import atomic_directory, check_writable, write_json_atomic, write_text_atomic
from sft_cli.rundir.checkpoints import clean_stale_temporaries, find_resume_point, list_checkpoints
from sft_cli.rundir.lock import RunLock
from sft_cli.rundir.model_files import check_model_files
from sft_cli.tasks.registry import build_task
from sft_cli.tasks.specs import TASK_SPECS
from sft_cli.ui.progress import print_per_class, print_table

log = logging.getLogger("sft")

EVAL_FILES = ("eval.json", "confusion_matrix.png", "predictions.jsonl", "report.png")


def check_output_dir(run_dir: Path, overwrite: bool, resume: bool) -> None:
    """Decide before any compute whether this run may write into `output.dir`; never lose anyone's files.

    A finished run, or an interrupted one with checkpoints, is only replaced with --overwrite (or continued
    with --resume); a non-empty directory that is no sft run only with --overwrite, and then its files stay;
    a file sft did not write in a path a run writes (model/, checkpoints/, eval.json, ...) is always refused.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise SftError(f"output.dir: {run_dir} is a file — set output.dir to a directory")
    if not resume and not overwrite:
        _refuse_replacing(run_dir)
    if not resume:
        manifest.refuse_foreign(run_dir)
    check_writable(run_dir, "output.dir", "choose a writable directory")


def _refuse_replacing(run_dir: Path) -> None:
    """Without --overwrite: an empty directory, or an sft run that left nothing worth keeping."""
    if manifest.is_sft_run(run_dir) or (run_dir / "summary.json").exists():
        if (run_dir / "summary.json").exists():
            raise SftError(
                f"output.dir: {run_dir} already holds a finished run — pass --overwrite, or set output.dir=<new dir>"
            )
        saved = list_checkpoints(run_dir / "checkpoints")
        if saved:
            raise SftError(
                f"output.dir: {run_dir} holds an interrupted run (checkpoint {saved[-1].name}) — pass --resume to "
                "continue it, or --overwrite to delete its checkpoints and start over"
            )
        return
    others = manifest.other_entries(run_dir)
    if others:
        shown = ", ".join(others[:4]) + (" ..." if len(others) > 4 else "")
        raise SftError(
            f"output.dir: {run_dir} is not empty and holds no sft run ({shown}) — set output.dir to a new "
            "directory, or pass --overwrite to train beside those files (they are kept)"
        )


def train(
    recipe: Recipe,
    command: str,
    resume: Optional[str] = None,
    overwrite: bool = False,
    resume_command: str = "",
    scratch_cache: Optional[Path] = None,
) -> dict[str, Any]:
    """`sft pretrain` / `sft finetune`: train, keep the best (or last) model in model/, write summary.json.

    The run directory is locked for the whole run (rank 0 holds it); `status.json` says how it ended.
    `scratch_cache` (`sft check`) keeps the parsed and tokenized data out of the shared cache.
    """
    spec = TASK_SPECS[recipe.task]
    if command not in (spec.command, *spec.also_runs_with):
        other = spec.command
        raise SftError(f"task: '{recipe.task}' runs with `sft {other}`, not `sft {command}`")
    run_dir = Path(recipe.output.dir)
    rank_zero = os.environ.get("RANK", "0") == "0"
    with stop_on_signals(), RunLock(run_dir, command) if rank_zero else nullcontext():
        check_output_dir(run_dir, overwrite, resume is not None)
        started: dict[str, bool] = {"training": False}
        try:
            return _train(recipe, run_dir, resume, resume_command, started, scratch_cache, command)
        except Interrupted as stop:
            if rank_zero:
                write_status(run_dir, "interrupted", checkpoint=str(stop.checkpoint), resume=resume_command)
            raise
        except BaseException as err:
            if rank_zero and started["training"]:  # before that point nothing in output.dir changed
                _record_failure(run_dir, err, resume_command)
            if is_storage_error(err) and not isinstance(err, StorageError):
                resumable = resume_command and list_checkpoints(run_dir / "checkpoints")
                raise StorageError(
                    storage_message(err, f"resume: {resume_command}" if resumable else "run again")
                ) from err
            raise


def _record_failure(run_dir: Path, err: BaseException, resume_command: str) -> None:
    """status.json after a run stopped early: `interrupted` when a checkpoint can resume it, else `failed`.

    A run stopped by a signal or by the disk (full, read-only) is resumable from its newest checkpoint; one
    whose recipe or data went wrong is failed. Written best-effort: a full disk may refuse this file too.
    """
    error = " ".join(str(err).split())[:500] or type(err).__name__
    saved = list_checkpoints(run_dir / "checkpoints")
    try:
        if saved and (isinstance(err, Stopped) or is_storage_error(err)):
            write_status(run_dir, "interrupted", checkpoint=str(saved[-1]), resume=resume_command, error=error)
        else:
            write_status(run_dir, "failed", error=error)
    except OSError:
        log.warning("could not update %s", run_dir / "status.json")


def _train(
    recipe: Recipe,
    run_dir: Path,
    resume: Optional[str],
    resume_command: str,
    started: dict[str, bool],
    scratch_cache: Optional[Path],
    command: str = "finetune",
) -> dict[str, Any]:
    resume_from = find_resume_point(run_dir, resume or None) if resume is not None else None
    limit_heap_retention()
    accelerator = make_accelerator(recipe.engine)
    set_seed(recipe.engine.seed)
    task = build_task(recipe)
    task.command = command
    before = tokenizing_stats()
    # the first process fills the data cache (file lock, no collective); the rest read it
    with tokenize_once(recipe, scratch_cache) as (_, _, cache):
        task.data_cache = cache
        task.setup(train=True)
    tokenized = gather_object([tokenizing_stats() - before])
    if accelerator.is_main_process:
        clean_stale_temporaries(run_dir)
        if resume_from is None:
            manifest.remove_owned(run_dir)
        write_text_atomic(run_dir / "recipe.yaml", to_yaml(recipe))
        write_status(run_dir, "running", pid=os.getpid())
        manifest.record(run_dir, *(run_dir / name for name in ("recipe.yaml", "status.json", "metrics.jsonl")))
    started["training"] = True
    trackers = start_trackers(recipe, run_dir, resume_from is not None) if accelerator.is_main_process else None
    status = "FAILED"
    try:
        summary = _fit(recipe, run_dir, accelerator, task, resume_from, resume_command, tokenized, trackers)
        status = "FINISHED"
        return summary
    except Interrupted:
        status = "KILLED"
        raise
    finally:
        if trackers is not None:
            trackers.finish(status)


def start_trackers(recipe: Recipe, run_dir: Path, resume: bool) -> Trackers:
    """The recipe's experiment trackers, started with the resolved recipe as params (output.report_to)."""
    from sft_cli.engine.tracking import flatten

    trackers = Trackers(recipe.output, run_dir, recipe.name, resume=resume)
    if trackers.names:
        trackers.start(flatten(to_dict(recipe)))
    return trackers


def _fit(
    recipe: Recipe,
    run_dir: Path,
    accelerator: Any,
    task: Any,
    resume_from: Optional[Path],
    resume_command: str,
    tokenized: list,
    trackers: Optional[Trackers],
) -> dict[str, Any]:
    trainer = Trainer(
        task,
        accelerator,
        recipe.schedule,
        recipe.optim,
        recipe.engine,
        recipe.output,
        recipe.loss,
        run_dir,
        resume_command,
        trackers,
    )
    trainer.setup(resume_from)
    if accelerator.is_main_process:
        p = trainer.params
        log.info(
            "parameters: %s trainable of %s (%.2f%%)",
            f"{p['trainable_params']:,}",
            f"{p['total_params']:,}",
            p["trainable_pct"],
        )
    summary = trainer.fit()
    best = run_dir / "best-model"
    if recipe.output.keep_best and best.is_dir():
        if accelerator.is_main_process:
            with atomic_directory(run_dir / "model") as tmp:
                shutil.copytree(best, tmp, dirs_exist_ok=True)
            manifest.record(run_dir, run_dir / "model")
        summary["model_from_step"] = summary["best_step"]
    else:
        trainer.save_model(run_dir / "model")
        summary["model_from_step"] = summary["steps"]
    summary.update(task.summary_extras())
    summary["skipped_rows"] = task.skipped.total()
    summary["skipped_rows_by_split"] = task.skipped.by_split
    summary["tokenized_rows_by_rank"] = tokenized
    history = trainer.state.history
    if history and history[0]["step"] == 0:
        summary["initial_eval"] = history[0]
    if task.eval_set is not None and trainer.state.history:
        summary["eval"] = next(
            (h for h in trainer.state.history if h["step"] == summary["model_from_step"]), trainer.state.history[-1]
        )
    if trackers is not None and trackers.ids:
        summary["trackers"] = trackers.ids
    if accelerator.is_main_process:
        manifest.record(run_dir, run_dir / "summary.json")  # first: a failure below must not orphan it
        write_json_atomic(run_dir / "summary.json", summary)
        for directory in (run_dir / "model", run_dir / "best-model"):
            write_card(recipe, run_dir, directory, getattr(task, "names", None))
        _report(run_dir)
        if trackers is not None:
            trackers.log_artifacts()
        write_status(run_dir, "finished")
        manifest.record(run_dir, *(run_dir / name for name in ("summary.json", "model", "best-model", "report.png")))
        print_table(f"{recipe.name}: training summary", {k: v for k, v in summary.items() if k != "eval"})
    accelerator.end_training()
    return summary


def _report(run_dir: Path) -> None:
    """report.png; matplotlib is imported here, after training, so it never adds to the training peak memory."""
    from sft_cli.ui.plots import report_png

    report_png([run_dir], run_dir / "report.png")


def evaluate_model(
    recipe: Recipe, model_dir: Optional[str] = None, scratch_cache: Optional[Path] = None
) -> dict[str, Any]:
    """`sft eval`: the task's metrics for a trained model on data.eval; writes eval.json."""
    run_dir = Path(recipe.output.dir)
    directory = Path(model_dir) if model_dir else run_dir / "model"
    if not (directory / "config.json").exists():
        raise SftError(f"--model: no trained model in {directory} — run `sft finetune` first or pass --model DIR")
    if not recipe.data.eval:
        raise SftError("data.eval: required by `sft eval` — set it to a held-out file")
    check_model_files(directory)
    manifest.refuse_foreign(run_dir, EVAL_FILES)
    accelerator = make_accelerator(recipe.engine, training=False)
    set_seed(recipe.engine.seed)
    task = build_task(recipe)
    with tokenize_once(recipe, scratch_cache) as (_, _, cache):
        task.data_cache = cache
        task.setup(model_dir=str(directory), train=False)
    model = accelerator.prepare_model(task.model, evaluation_mode=True)
    metrics = evaluate_over_processes(task, model, accelerator, recipe.eval.batch_size)
    metrics["model"] = str(directory)
    metrics["skipped_rows"] = task.skipped.count("data.eval")
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        task.report(metrics, run_dir)  # plots, predictions.jsonl (moved out of the metrics)
        write_json_atomic(run_dir / "eval.json", metrics)
        if directory.resolve() == (run_dir / "model").resolve():  # the card quotes eval.json's metrics
            write_card(recipe, run_dir, directory, getattr(task, "names", None))
        if (run_dir / "metrics.jsonl").exists():
            _report(run_dir)
        manifest.record(run_dir, *(run_dir / name for name in EVAL_FILES if (run_dir / name).exists()))
        _track_eval(recipe, run_dir, metrics)
        print_table(
            f"{recipe.name}: eval on {recipe.data.eval}",
            {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        )
        if "per_class" in metrics:
            print_per_class(metrics["per_class"])
    return metrics


def _track_eval(recipe: Recipe, run_dir: Path, metrics: dict[str, Any]) -> None:
    """`sft eval` adds its metrics (at the trained step) and pictures to the training run's tracker runs."""
    trackers = start_trackers(recipe, run_dir, resume=True)
    if not trackers.active:
        return
    try:
        step = _trained_steps(run_dir)
        trackers.log({"step": step, **{k if k.startswith("eval_") else f"eval_{k}": v for k, v in metrics.items()}})
        trackers.log_artifacts()
    finally:
        trackers.finish()


def _trained_steps(run_dir: Path) -> int:
    """The steps summary.json says the run trained (0 when it has none)."""
    import json

    try:
        return int(json.loads((run_dir / "summary.json").read_text()).get("steps", 0))
    except (OSError, ValueError, TypeError):
        return 0
