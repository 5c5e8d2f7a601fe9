"""Range and cross-field checks that types alone cannot express; each failure names the recipe key."""

from __future__ import annotations

import difflib

from sft_cli.errors import SftError
from sft_cli.schema import (
    DEVICES,
    FREEZE_POLICIES,
    OBJECTIVES,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULERS,
    STRATEGIES,
    TASKS,
    Recipe,
)


def _check(ok: bool, source: str, message: str) -> None:
    if not ok:
        raise SftError(f"{source}: {message}")


def _check_choice(value: str, choices: tuple[str, ...], key: str, source: str) -> None:
    if value not in choices:
        near = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
        hint = f" — did you mean '{near[0]}'?" if near else ""
        raise SftError(f"{source}: '{key}' must be one of {', '.join(choices)}; got '{value}'{hint}")


def validate(recipe: Recipe, source: str = "recipe") -> None:
    """Range and cross-field checks that types alone cannot express."""
    _check_choice(recipe.task, TASKS, "task", source)
    _check_choice(recipe.objective, OBJECTIVES, "objective", source)
    _check_choice(recipe.freeze.policy, FREEZE_POLICIES, "freeze.policy", source)
    _check_choice(recipe.optim.name, OPTIMIZERS, "optim.name", source)
    _check_choice(recipe.schedule.scheduler, SCHEDULERS, "schedule.scheduler", source)
    _check_choice(recipe.engine.precision, PRECISIONS, "engine.precision", source)
    _check_choice(recipe.engine.device, DEVICES, "engine.device", source)
    _check_choice(recipe.engine.attention, ("auto", "eager", "sdpa"), "engine.attention", source)
    _check_choice(recipe.engine.distributed.strategy, STRATEGIES, "engine.distributed.strategy", source)
    sched, optim = recipe.schedule, recipe.optim
    _check(optim.lr > 0, source, f"'optim.lr' must be > 0; got {optim.lr}")
    _check(optim.weight_decay >= 0, source, "'optim.weight_decay' must be >= 0")
    _check(len(optim.betas) == 2, source, "'optim.betas' must be two numbers, e.g. [0.9, 0.999]")
    _check(sched.batch_size >= 1, source, f"'schedule.batch_size' must be >= 1; got {sched.batch_size}")
    _check(sched.grad_accum >= 1, source, f"'schedule.grad_accum' must be >= 1; got {sched.grad_accum}")
    _check(sched.epochs >= 0, source, f"'schedule.epochs' must be >= 0; got {sched.epochs}")
    _check(sched.max_steps is None or sched.max_steps >= 1, source, "'schedule.max_steps' must be >= 1 or null")
    _check(sched.epochs > 0 or sched.max_steps, source, "set 'schedule.epochs' > 0 or 'schedule.max_steps'")
    _check(
        0 <= sched.warmup < 1 or float(sched.warmup).is_integer(),
        source,
        f"'schedule.warmup' is a ratio in [0, 1) or a whole number of steps; got {sched.warmup}",
    )
    _check(sched.log_every >= 1, source, "'schedule.log_every' must be >= 1")
    _check(
        sched.eval_every == "epoch" or (sched.eval_every.isdigit() and int(sched.eval_every) >= 1),
        source,
        f"'schedule.eval_every' must be 'epoch' or a number of steps; got '{sched.eval_every}'",
    )
    if sched.early_stopping is not None:
        _check_choice(sched.early_stopping.mode, ("min", "max"), "schedule.early_stopping.mode", source)
        _check(sched.early_stopping.patience >= 1, source, "'schedule.early_stopping.patience' must be >= 1")
    _check(recipe.data.max_length >= 1, source, f"'data.max_length' must be >= 1; got {recipe.data.max_length}")
    _check(recipe.freeze.last_n >= 0, source, "'freeze.last_n' must be >= 0")
    _check(recipe.output.keep >= 1, source, "'output.keep' must be >= 1")
    _check(recipe.eval.batch_size >= 1, source, "'eval.batch_size' must be >= 1")
    _check(recipe.loss.lm >= 0 and recipe.loss.supervised >= 0, source, "loss weights must be >= 0")
    _check(recipe.tokenizer.vocab_size >= 16, source, "'tokenizer.vocab_size' must be >= 16")
    _check(bool(recipe.output.dir), source, "'output.dir' must be a directory path")
    _check(recipe.data.train is not None, source, "'data.train' is required: a file, directory or hub name")
