"""Range and cross-field checks that types alone cannot express; each failure names the recipe key."""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import Any, Optional

from sft_cli.config.schema import (
    DEVICES,
    FORMATS,
    FREEZE_POLICIES,
    HISTORY,
    MIXTURE_GLOBAL_KEYS,
    MIXTURE_KEYS,
    MIXTURE_TASKS,
    NOISE_SCHEDULES,
    OBJECTIVES,
    OPTIMIZERS,
    PRECISIONS,
    PREDICTIONS,
    PREFERENCE_LOSSES,
    REFERENCE_MODES,
    REGRESSION_LOSSES,
    SAMPLERS,
    SCHEDULERS,
    STRATEGIES,
    TASKS,
    TRACKER_OPTIONS,
    TRACKERS,
    TRAIN_ON,
    DataConfig,
    Recipe,
)
from sft_cli.errors import SftError


def _check(ok: bool, source: str, message: str) -> None:
    if not ok:
        raise SftError(f"{source}: {message}")


def _check_choice(value: str, choices: tuple[str, ...], key: str, source: str) -> None:
    if value not in choices:
        near = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
        hint = f" — did you mean '{near[0]}'?" if near else ""
        raise SftError(f"{source}: '{key}' must be one of {', '.join(choices)}; got '{value}'{hint}")


# Bounds of every numeric recipe key: (low, low inclusive, high, high inclusive); None is unbounded.
# A key set to null (where the schema allows it) is not checked; list values are checked element-wise.
# tests/unit/test_recipe.py fails when a numeric key is added to the schema without a row here.
RANGES: dict[str, tuple[Optional[float], bool, Optional[float], bool]] = {
    "tokenizer.vocab_size": (16, True, None, False),
    "data.max_length": (1, True, None, False),
    "data.num_proc": (1, True, 256, True),
    "data.shuffle_buffer": (1, True, None, False),
    "schedule.max_tokens": (1, True, None, False),
    "engine.distributed.zero_stage": (1, True, 3, True),
    "data.image_size": (1, True, None, False),
    "data.max_duration": (0, False, None, False),
    "data.mean": (None, False, None, False),  # any finite number
    "data.std": (0, False, None, False),
    "data.augment.random_crop_padding": (0, True, None, False),
    "freeze.last_n": (0, True, None, False),
    "freeze.lora.r": (1, True, None, False),
    "freeze.lora.alpha": (0, False, None, False),
    "freeze.lora.dropout": (0, True, 1, False),
    "loss.supervised": (0, True, None, False),
    "loss.lm": (0, True, None, False),
    "loss.prompt": (0, True, None, False),
    "loss.label_smoothing": (0, True, 1, False),
    "loss.snr_gamma": (0, False, None, False),
    "loss.cond_dropout": (0, True, 1, False),
    "loss.beta": (0, False, None, False),
    "loss.gamma": (None, False, None, False),  # any finite number
    "loss.sft_weight": (0, True, None, False),
    "engine.ema_decay": (0, False, 1, False),
    "eval.num_samples": (1, True, None, False),
    "eval.num_inference_steps": (1, True, None, False),
    "eval.guidance_scale": (0, True, None, False),
    "predict.num_images": (1, True, None, False),
    "predict.num_inference_steps": (1, True, None, False),
    "predict.guidance_scale": (0, True, None, False),
    "optim.lr": (0, False, None, False),
    "optim.weight_decay": (0, True, None, False),
    "optim.momentum": (0, True, 1, False),
    "optim.betas": (0, True, 1, False),
    "optim.eps": (0, False, None, False),
    "optim.layer_lr_decay": (0, False, 1, True),
    "schedule.epochs": (0, True, None, False),
    "schedule.max_steps": (1, True, None, False),
    "schedule.batch_size": (1, True, None, False),
    "schedule.grad_accum": (1, True, None, False),
    "schedule.max_grad_norm": (0, False, None, False),
    "schedule.warmup": (0, True, None, False),
    "schedule.step_size": (1, True, None, False),
    "schedule.gamma": (0, False, None, False),
    "schedule.early_stopping.patience": (1, True, None, False),
    "schedule.log_every": (1, True, None, False),
    "engine.seed": (0, True, 2**32 - 1, True),
    "engine.num_workers": (0, True, None, False),
    "engine.peak_tflops": (0, False, None, False),
    "output.save_every": (1, True, None, False),
    "output.keep": (1, True, None, False),
    "eval.batch_size": (1, True, None, False),
    "eval.num_beams": (1, True, None, False),
    "eval.max_new_tokens": (1, True, None, False),
    "eval.length_penalty": (None, False, None, False),  # any finite number
    "eval.no_repeat_ngram_size": (0, True, None, False),
    "data.max_target_length": (1, True, None, False),
    "eval.threshold": (0, False, 1, False),
    "eval.max_answer_length": (1, True, None, False),
    "eval.n_best": (1, True, None, False),
    "eval.null_threshold": (None, False, None, False),  # any finite number
    "data.stride": (0, True, None, False),
    "predict.batch_size": (1, True, None, False),
    "predict.top_k": (1, True, None, False),
    "predict.max_new_tokens": (1, True, None, False),
    "predict.num_beams": (1, True, None, False),
    "predict.length_penalty": (None, False, None, False),  # any finite number
    "predict.no_repeat_ngram_size": (0, True, None, False),
    "predict.temperature": (0, False, None, False),
    "predict.top_p": (0, False, 1, True),
    "predict.seed": (0, True, 2**32 - 1, True),
}


def _value_at(recipe: Recipe, key: str) -> Any:
    """The value of a dotted key, or None when a parent section is null."""
    node: Any = recipe
    for part in key.split("."):
        if node is None:
            return None
        node = getattr(node, part)
    return node


def _describe(low: Optional[float], low_in: bool, high: Optional[float], high_in: bool) -> str:
    if low is not None and high is not None:
        return f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
    if low is not None:
        return f"{'>=' if low_in else '>'} {low:g}"
    if high is not None:
        return f"{'<=' if high_in else '<'} {high:g}"
    return "a finite number"


def check_ranges(recipe: Recipe, source: str = "recipe") -> None:
    """Every numeric key within its bounds (RANGES), as a one-line error naming the key and the value."""
    for key, (low, low_in, high, high_in) in RANGES.items():
        value = _value_at(recipe, key)
        for item in value if isinstance(value, list) else [value]:
            if item is None or isinstance(item, bool):
                continue
            too_low = low is not None and (item < low if low_in else item <= low)
            too_high = high is not None and (item > high if high_in else item >= high)
            if too_low or too_high or not math.isfinite(item):
                raise SftError(f"{source}: '{key}' must be {_describe(low, low_in, high, high_in)}; got {value}")


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
    _check_choice(recipe.engine.kernels, ("auto", "none"), "engine.kernels", source)
    _check_choice(recipe.eval.sampler, SAMPLERS, "eval.sampler", source)
    if recipe.loss.prediction is not None:
        _check_choice(recipe.loss.prediction, PREDICTIONS, "loss.prediction", source)
    if recipe.loss.noise_schedule is not None:
        _check_choice(recipe.loss.noise_schedule, NOISE_SCHEDULES, "loss.noise_schedule", source)
    _check_preference(recipe, source)
    _check_choice(recipe.data.asr_task, ("transcribe", "translate"), "data.asr_task", source)
    _check_choice(recipe.engine.distributed.strategy, STRATEGIES, "engine.distributed.strategy", source)
    _check_deepspeed(recipe, source)
    _check(
        not recipe.engine.ema or recipe.engine.distributed.strategy == "ddp",
        source,
        f"'engine.ema' keeps the average of whole weights: not with engine.distributed.strategy "
        f"{recipe.engine.distributed.strategy} (sharded) — use ddp, or set engine.ema: false",
    )
    _check_choice(recipe.data.format, FORMATS, "data.format", source)
    _check_choice(recipe.loss.train_on, TRAIN_ON, "loss.train_on", source)
    _check_choice(recipe.data.history, HISTORY, "data.history", source)
    _check_choice(recipe.loss.regression, REGRESSION_LOSSES, "loss.regression", source)
    _check_class_weights(recipe.loss.class_weights, source)
    _check(
        recipe.data.label_fields is None or len(recipe.data.label_fields) > 0,
        source,
        "'data.label_fields' must list at least one column (or be null to use data.label_field)",
    )
    check_ranges(recipe, source)
    sched, optim = recipe.schedule, recipe.optim
    _check(len(optim.betas) == 2, source, "'optim.betas' must be two numbers, e.g. [0.9, 0.999]")
    _check(sched.epochs > 0 or sched.max_steps, source, "set 'schedule.epochs' > 0 or 'schedule.max_steps'")
    _check(
        0 <= sched.warmup < 1 or float(sched.warmup).is_integer(),
        source,
        f"'schedule.warmup' is a ratio in [0, 1) or a whole number of steps; got {sched.warmup}",
    )
    _check(
        sched.eval_every == "epoch" or (sched.eval_every.isdigit() and int(sched.eval_every) >= 1),
        source,
        f"'schedule.eval_every' must be 'epoch' or a number of steps; got '{sched.eval_every}'",
    )
    if sched.early_stopping is not None:
        _check_choice(sched.early_stopping.mode, ("min", "max"), "schedule.early_stopping.mode", source)
    _check(bool(recipe.output.dir), source, "'output.dir' must be a directory path")
    _check_trackers(recipe.output, source)
    _check(recipe.data.train is not None, source, "'data.train' is required: a file, directory or hub name")
    if recipe.data.streaming or sched.max_tokens:
        what = "'data.streaming'" if recipe.data.streaming else "'schedule.max_tokens'"
        _check(
            recipe.task == "language-modeling",
            source,
            f"{what} is for pretraining (task: language-modeling); task {recipe.task} loads its data in full",
        )
    _check(
        not recipe.tokenizer.train or recipe.task == "language-modeling",
        source,
        f"'tokenizer.train' trains a tokenizer only in pretraining (task: language-modeling), not task "
        f"{recipe.task} — pretrain first (`sft pretrain` with tokenizer.train: true), then set backbone.name to "
        "that run's model/",
    )
    _check(
        not recipe.data.streaming or bool(sched.max_steps or sched.max_tokens),
        source,
        "'data.streaming': a stream has no length — set 'schedule.max_steps' or 'schedule.max_tokens'",
    )
    if is_mixture(recipe.data.train):
        _check_mixture(recipe, source)
    for name in ("train", "eval", "unlabeled")[1 if is_mixture(recipe.data.train) else 0 :]:
        value = getattr(recipe.data, name)
        _check(
            value is None
            or isinstance(value, str)
            or (isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value)),
            source,
            f"'data.{name}' must be a path, glob, hub name or a non-empty list of paths; got {value!r}",
        )


def _check_preference(recipe: Recipe, source: str) -> None:
    """loss.preference / loss.reference choices and what each needs."""
    loss = recipe.loss
    _check_choice(loss.preference, PREFERENCE_LOSSES, "loss.preference", source)
    _check_choice(loss.reference, REFERENCE_MODES, "loss.reference", source)
    if recipe.task != "preference":
        return
    _check(
        loss.reference != "adapters-off" or recipe.freeze.policy == "lora",
        source,
        "'loss.reference: adapters-off' takes the reference from the base model under LoRA adapters — set "
        "freeze.policy: lora, or loss.reference: precompute",
    )
    for key, used in (("data.packing", recipe.data.packing), ("data.unlabeled", recipe.data.unlabeled)):
        _check(not used, source, f"'{key}' is generation's; task preference packs each pair itself — remove it")
    _check(
        recipe.loss.prompt == 0,
        source,
        "'loss.prompt' is generation's; task preference scores only the completions — remove it",
    )
    _check(
        loss.label_smoothing == 0 or loss.preference in ("dpo", "simpo"),
        source,
        f"'loss.label_smoothing' (conservative DPO) applies to dpo and simpo, not {loss.preference} — set it to 0",
    )


def _check_deepspeed(recipe: Recipe, source: str) -> None:
    """The DeepSpeed config file exists, parses and agrees with the recipe; DeepSpeed cannot skip a bad batch."""
    distributed = recipe.engine.distributed
    ds_config = distributed.deepspeed_config
    _check(
        ds_config is None or Path(ds_config).expanduser().is_file(),
        source,
        f"'engine.distributed.deepspeed_config': file not found: {ds_config}",
    )
    if distributed.strategy != "deepspeed":
        return
    problem = config_file_problem(ds_config, recipe.schedule) if ds_config else None
    _check(problem is None, source, problem or "")
    _check(
        not recipe.engine.skip_nonfinite,
        source,
        "'engine.skip_nonfinite': DeepSpeed steps inside backward, so a non-finite batch cannot be skipped — "
        "set it to false or use strategy ddp/fsdp",
    )


def _check_class_weights(weights: Any, source: str) -> None:
    """null, 'balanced', or a mapping of label -> positive number."""
    if weights is None or weights == "balanced":
        return
    if not isinstance(weights, dict) or not weights:
        raise SftError(f"{source}: 'loss.class_weights' must be null, balanced, or {{label: weight}}; got {weights!r}")
    for label, value in weights.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
            raise SftError(f"{source}: 'loss.class_weights.{label}' must be a number > 0; got {value!r}")


# DeepSpeed config keys the recipe owns: a config file may leave them out or "auto", not contradict them
RECIPE_OWNED = {
    "train_micro_batch_size_per_gpu": "schedule.batch_size",
    "gradient_accumulation_steps": "schedule.grad_accum",
    "gradient_clipping": "schedule.max_grad_norm",
}
OWN_SECTIONS = {"optimizer": "optim", "scheduler": "schedule.scheduler"}


def config_file_problem(path: str, schedule: Any) -> Optional[str]:
    """What is wrong with a DeepSpeed JSON config: it must parse, leave optimizer/scheduler to the recipe and agree."""
    where = f"'engine.distributed.deepspeed_config': {path}"
    try:
        config = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError) as err:
        return f"{where} is not a readable JSON file ({err}) — fix or remove it"
    if not isinstance(config, dict):
        return f"{where} must be a JSON object of DeepSpeed settings"
    for section, owner in OWN_SECTIONS.items():
        if section in config:
            return f"{where}: remove its '{section}' section — sft builds it from the recipe's {owner}"
    for key, value in recipe_owned_values(schedule).items():
        given = config.get(key, "auto")
        if given != "auto" and given != value:
            return f"{where}: '{key}' is {given} but {RECIPE_OWNED[key]} is {value} — set it to \"auto\" or drop it"
    return None


def recipe_owned_values(schedule: Any) -> dict[str, Any]:
    """The RECIPE_OWNED DeepSpeed settings, from the recipe's schedule."""
    return {
        "train_micro_batch_size_per_gpu": schedule.batch_size,
        "gradient_accumulation_steps": schedule.grad_accum,
        "gradient_clipping": schedule.max_grad_norm or 0.0,
    }


def _check_trackers(output: Any, source: str) -> None:
    """output.report_to names Accelerate's trackers; output.tracker holds a mapping of options per tracker."""
    for name in output.report_to:
        _check_choice(str(name), TRACKERS, "output.report_to", source)
    for name, options in output.tracker.items():
        _check_choice(str(name), TRACKERS, "output.tracker", source)
        _check(
            options is None or isinstance(options, dict),
            source,
            f"'output.tracker.{name}' must be a mapping of options, e.g. {{project: my-project}}; got {options!r}",
        )
        known = TRACKER_OPTIONS.get(str(name))
        for option in (options or {}) if known else ():
            if option not in known:
                near = difflib.get_close_matches(str(option), known, n=1, cutoff=0.6)
                hint = f"did you mean '{near[0]}'?" if near else f"known options: {', '.join(known)}"
                raise SftError(f"{source}: unknown option 'output.tracker.{name}.{option}' — {hint}")
        _check(
            name in output.report_to or (name == "tensorboard" and output.tensorboard),
            source,
            f"'output.tracker.{name}' sets options for a tracker that is not in output.report_to — add {name} there",
        )


def is_mixture(train: Any) -> bool:
    """data.train is a list of sources (mappings), not a path or a list of paths."""
    return isinstance(train, (list, tuple)) and any(isinstance(item, dict) for item in train)


def _check_mixture(recipe: Recipe, source: str) -> None:
    """Each source: a path, a weight > 0 or num_samples >= 1 (not both), and data keys of the right type."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    _check(
        recipe.task in MIXTURE_TASKS,
        source,
        f"'data.train' as a list of sources (a mixture) is for tasks {', '.join(MIXTURE_TASKS)}; task {recipe.task} "
        "reads one source — merge the files, or use a list of paths",
    )
    _check(
        not recipe.data.packing,
        source,
        "'data.packing' with a mixture: each epoch draws rows from the sources by weight, packing would fix them "
        "ahead — set data.packing: false",
    )
    per_source = [f for f in vars(DataConfig()) if f not in MIXTURE_GLOBAL_KEYS]
    known = (*MIXTURE_KEYS, *per_source)
    for index, entry in enumerate(recipe.data.train):
        key = f"data.train[{index}]"
        _check(isinstance(entry, dict), source, f"'{key}' must be a mapping {{path, weight}}; got {entry!r}")
        for name in entry:
            if name in MIXTURE_GLOBAL_KEYS:
                raise SftError(f"{source}: '{key}.{name}' is set once for the whole mixture — move it to data.{name}")
            if name not in known:
                near = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
                hint = f"did you mean '{key}.{near[0]}'?" if near else f"known keys: {', '.join(known)}"
                raise SftError(f"{source}: unknown key '{key}.{name}' — {hint}")
        _check(bool(entry.get("path")), source, f"'{key}.path' is required: a file, glob, directory or hub name")
        weight, samples = entry.get("weight"), entry.get("num_samples")
        _check(
            weight is None or samples is None,
            source,
            f"'{key}': set weight (a share of the mix) or num_samples (rows per epoch), not both",
        )
        _check(
            weight is None or (isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight > 0),
            source,
            f"'{key}.weight' must be a number > 0; got {weight!r}",
        )
        _check(
            samples is None or (isinstance(samples, int) and not isinstance(samples, bool) and samples >= 1),
            source,
            f"'{key}.num_samples' must be a whole number >= 1; got {samples!r}",
        )
        _check(
            samples is None or not recipe.data.streaming,
            source,
            f"'{key}.num_samples': a stream has no epochs to count rows in — give it a weight",
        )
        fields = {k: v for k, v in entry.items() if k not in MIXTURE_KEYS}
        try:
            data = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), fields))
        except OmegaConfBaseException as err:
            name = getattr(err, "full_key", None) or "?"
            raise SftError(f"{source}: '{key}.{name}' has the wrong type — {str(err).splitlines()[0]}") from None
        _check_choice(data.format, FORMATS, f"{key}.format", source)
