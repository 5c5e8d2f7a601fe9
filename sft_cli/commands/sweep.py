"""`sft sweep`: hyperparameter search on Optuna; every trial is a normal run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from rich.table import Table

from sft_cli.config.recipe import Recipe, to_yaml
from sft_cli.errors import SftError
from sft_cli.rundir.atomic import write_json_atomic, write_text_atomic
from sft_cli.tasks.specs import TASK_SPECS
from sft_cli.ui.progress import stdout

SAMPLERS = ("tpe", "random", "grid")


def _suggest(trial: Any, key: str, space: Any) -> Any:
    """A value for one recipe key: a list is a choice, {low, high, log} a range (int when both are ints)."""
    if isinstance(space, list):
        return trial.suggest_categorical(key, space)
    if isinstance(space, dict) and {"low", "high"} <= set(space):
        low, high, log = space["low"], space["high"], bool(space.get("log", False))
        if isinstance(low, int) and isinstance(high, int):
            return trial.suggest_int(key, low, high, log=log)
        return trial.suggest_float(key, float(low), float(high), log=log)
    raise SftError(f"sweep.{key}: use a list of values or {{low, high, log}}")


def sweep(
    recipe: Recipe,
    load: Callable[[list[str]], Recipe],
    trials: int,
    sampler: str,
    metric: str | None,
    direction: str | None,
) -> dict:
    """Run up to `trials` trials (resuming a previous sweep in output.dir); return the best."""
    import optuna

    from sft_cli.commands import train as commands

    if not recipe.sweep:
        raise SftError(
            "sweep: the recipe has no search space — add e.g. sweep: {optim.lr: {low: 1e-5, high: 1e-3, log: true}}"
        )
    if sampler not in SAMPLERS:
        raise SftError(f"--sampler: one of {', '.join(SAMPLERS)}")
    metric, direction = sweep_objective(recipe, metric, direction)
    root = Path(recipe.output.dir)
    root.mkdir(parents=True, exist_ok=True)
    for key in recipe.sweep:  # every key must be a real recipe key before any trial runs
        load([f"{key}={json.dumps(_first(recipe.sweep[key]))}"])
    if sampler == "grid":
        if not all(isinstance(v, list) for v in recipe.sweep.values()):
            raise SftError("sweep: the grid sampler needs a list of values for every key")
        chosen = optuna.samplers.GridSampler({k: list(v) for k, v in recipe.sweep.items()}, seed=recipe.engine.seed)
    elif sampler == "random":
        chosen = optuna.samplers.RandomSampler(seed=recipe.engine.seed)
    else:
        chosen = optuna.samplers.TPESampler(seed=recipe.engine.seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=recipe.name,
        storage=f"sqlite:///{root / 'sweep.db'}",
        sampler=chosen,
        direction=direction,
        load_if_exists=True,
    )

    def objective(trial: Any) -> float:
        overrides = [f"{k}={json.dumps(_suggest(trial, k, v))}" for k, v in recipe.sweep.items()]
        overrides += [f"output.dir={root / f'trial-{trial.number:03d}'}", "sweep={}"]
        trial_recipe = load(overrides)
        summary = commands.train(trial_recipe, TASK_SPECS[trial_recipe.task].command, overwrite=True)
        record = summary.get("eval") or {}
        value = record.get(metric, record.get(f"eval_{metric}"))
        if value is None:
            raise SftError(
                f"--metric: '{metric}' is not among the eval metrics ({', '.join(k for k in record if k.startswith('eval_'))})"
            )
        trial.set_user_attr("output_dir", trial_recipe.output.dir)
        return float(value)

    done = len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE])
    if trials > done:
        study.optimize(objective, n_trials=trials - done, catch=())
    return _report(study, recipe, load, root, metric)


def sweep_objective(recipe: Recipe, metric: str | None, direction: str | None) -> tuple[str, str]:
    """The metric a sweep optimizes and its direction: --metric/--direction, else early stopping's, else the task's."""
    from sft_cli.tasks.registry import TASKS

    es = recipe.schedule.early_stopping
    task = TASKS[recipe.task]  # a loaded recipe names a registered task
    default_metric, default_mode = (es.metric, es.mode) if es else (task.main_metric, task.main_mode)
    metric = metric or default_metric
    return metric, direction or ("maximize" if default_mode == "max" and metric == default_metric else "minimize")


def _first(space: Any) -> Any:
    return space[0] if isinstance(space, list) else space.get("low") if isinstance(space, dict) else space


def _report(study: Any, recipe: Recipe, load: Callable[[list[str]], Recipe], root: Path, metric: str) -> dict:
    """The results table (stdout + sweep.json) and the best trial's resolved recipe."""
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise SftError("sweep: no trial completed")
    rows = [
        {"trial": t.number, **t.params, metric: t.value, "output_dir": t.user_attrs.get("output_dir")} for t in complete
    ]
    table = Table(title=f"sweep {recipe.name}: {metric} ({study.direction.name.lower()})")
    for column in rows[0]:
        table.add_column(column)
    best = study.best_trial
    for row in rows:
        style = "bold green" if row["trial"] == best.number else None
        table.add_row(*[f"{v:.6g}" if isinstance(v, float) else str(v) for v in row.values()], style=style)
    stdout.print(table)
    best_recipe = load(
        [f"{k}={json.dumps(v)}" for k, v in best.params.items()]
        + [f"output.dir={best.user_attrs.get('output_dir')}", "sweep={}"]
    )
    write_text_atomic(root / "best-recipe.yaml", to_yaml(best_recipe))
    result = {
        "metric": metric,
        "direction": study.direction.name.lower(),
        "best_trial": best.number,
        "best_value": best.value,
        "best_params": best.params,
        "trials": rows,
    }
    write_json_atomic(root / "sweep.json", result)
    return result
