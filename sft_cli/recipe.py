"""The recipe schema: typed dataclasses merged with OmegaConf in strict mode.

This module is the only home of defaults and of cross-field checks. Loading a recipe fails before
any compute on an unknown key (with a "did you mean"), a wrong type, or an out-of-range value.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sft_cli.errors import SftError

TASKS = ("classification", "image-classification", "generation", "language-modeling")
FREEZE_POLICIES = ("none", "head-only", "last-n", "patterns", "lora")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("constant", "linear", "cosine", "step", "plateau")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")
OBJECTIVES = ("auto", "clm", "mlm")
STRATEGIES = ("ddp", "fsdp")


@dataclass
class BackboneConfig:
    """Which model to start from."""

    name: str = "minilm-l6"  # an alias of an embedded model, a local directory, or a hub id
    arch: Optional[str] = None  # a transformers model type (gpt2, llama, bert, resnet, ...)
    from_scratch: bool = False  # fresh random weights from the named (or `arch`) config
    config: dict[str, Any] = field(default_factory=dict)  # overrides applied to the model config
    trust_remote_code: bool = False


@dataclass
class TokenizerConfig:
    """Train a tokenizer on the training text (byte-level BPE) instead of the backbone's."""

    train: bool = False
    vocab_size: int = 8000


@dataclass
class AugmentConfig:
    """On-the-fly training augmentation for images; never applied at eval."""

    random_crop_padding: int = 0
    horizontal_flip: bool = False


@dataclass
class DataConfig:
    """Where the examples are and which fields hold what."""

    train: Optional[str] = None  # .jsonl/.json/.csv/.parquet/.txt, a save_to_disk dir, or a hub name
    eval: Optional[str] = None
    text_field: str = "text"
    label_field: str = "label"
    prompt_field: str = "prompt"
    response_field: str = "response"
    image_field: str = "image"
    template: Optional[str] = None  # e.g. "{prompt} =>", or "chat" for the tokenizer's chat template
    max_length: int = 128
    packing: bool = False
    unlabeled: Optional[str] = None  # an unlabeled corpus for the auxiliary LM loss
    image_size: Optional[int] = None
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class LoraConfig:
    """PEFT LoRA settings for `freeze.policy: lora`."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: Optional[list[str]] = None  # None: a default per architecture


@dataclass
class FreezeConfig:
    """Which parameters train."""

    policy: str = "none"
    last_n: int = 1
    embeddings: Optional[bool] = None  # True freezes, False unfreezes embeddings on top of any policy
    trainable: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class LossConfig:
    """The loss mix: L = supervised * L_sup + lm * L_lm."""

    supervised: float = 1.0
    lm: float = 0.0
    prompt: float = 0.0  # generation: weight of prompt tokens (0 = masked)


@dataclass
class OptimConfig:
    """Optimizer."""

    name: str = "adamw"
    lr: float = 5.0e-5
    weight_decay: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    layer_lr_decay: Optional[float] = None


@dataclass
class EarlyStoppingConfig:
    """Stop when the metric has not improved for `patience` evaluations."""

    metric: str = "eval_loss"
    mode: str = "min"
    patience: int = 2


@dataclass
class ScheduleConfig:
    """How long and how fast to train."""

    epochs: float = 3
    max_steps: Optional[int] = None  # caps epochs
    batch_size: int = 32  # per process
    grad_accum: int = 1
    max_grad_norm: Optional[float] = 1.0
    warmup: float = 0.1  # a ratio of the steps (< 1) or a number of steps (>= 1)
    scheduler: str = "linear"
    step_size: Optional[int] = None  # `step` scheduler: steps between decays (default: one epoch)
    gamma: float = 0.1  # `step` decay factor, `plateau` reduction factor
    eval_every: str = "epoch"  # "epoch" or a number of optimizer steps
    early_stopping: Optional[EarlyStoppingConfig] = None
    log_every: int = 10
    group_by_length: bool = True


@dataclass
class DistributedConfig:
    """Multi-process settings, passed to Accelerate."""

    strategy: str = "ddp"
    fsdp: dict[str, Any] = field(default_factory=dict)


@dataclass
class EngineConfig:
    """Device and numerics."""

    device: str = "auto"
    precision: str = "auto"
    seed: int = 42
    skip_nonfinite: bool = False
    grad_checkpointing: bool = False
    compile: bool = False
    num_workers: int = 0
    attention: str = "auto"  # auto: eager on CPU (faster for short sequences), sdpa on GPU; or eager | sdpa
    peak_tflops: Optional[float] = None  # for MFU in summary.json; None: measured with a short matmul
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


@dataclass
class OutputConfig:
    """What the run leaves on disk."""

    dir: str = "runs/run"
    save_every: Optional[int] = None
    keep: int = 2
    keep_best: bool = True
    merge_lora: bool = False
    tensorboard: bool = False


@dataclass
class EvalConfig:
    """Held-out evaluation."""

    batch_size: int = 64
    num_beams: int = 1
    max_new_tokens: int = 32


@dataclass
class Recipe:
    """A whole run."""

    name: str = "run"
    task: str = "classification"
    objective: str = "auto"  # language-modeling: clm | mlm | auto (by architecture)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: dict[str, Any] = field(default_factory=dict)


def _nested_dataclass(annotation: Any) -> Optional[type]:
    """The dataclass inside an annotation such as `Optional[EarlyStoppingConfig]`, if any."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _check_keys(values: Any, schema: type, where: str, source: str) -> None:
    """Reject unknown keys, suggesting the nearest real one."""
    if not isinstance(values, dict):
        return
    hints = typing.get_type_hints(schema)
    for key, value in values.items():
        path = f"{where}{key}"
        if key not in hints:
            known = list(hints)
            near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"did you mean '{where}{near[0]}'?" if near else f"known keys: {', '.join(known)}"
            raise SftError(f"{source}: unknown key '{path}' — {hint}")
        nested = _nested_dataclass(hints[key])
        if nested is not None and value is not None:
            if not isinstance(value, dict):
                raise SftError(f"{source}: '{path}' must be a mapping of {nested.__name__} fields")
            _check_keys(value, nested, f"{path}.", source)


def _type_name(annotation: Any) -> str:
    """A readable name for a field's type."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Union and len(args) == 1:
        return f"{_type_name(args[0])} or null"
    return getattr(annotation, "__name__", str(annotation)).replace("typing.", "")


def _field_type(path: str) -> str:
    """The expected type of a dotted recipe key, for error messages."""
    schema: Any = Recipe
    annotation: Any = Recipe
    for part in path.split("."):
        hints = typing.get_type_hints(schema) if dataclasses.is_dataclass(schema) else {}
        if part not in hints:
            return "a valid value"
        annotation = hints[part]
        schema = _nested_dataclass(annotation) or annotation
    return _type_name(annotation)


def _read_yaml(path: Path) -> dict:
    """Parse the recipe file into a plain mapping, with line/column on syntax errors."""
    if not path.is_file():
        raise SftError(f"recipe file not found: {path} — check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SftError(f"{path}: not UTF-8 text — save the recipe as UTF-8") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise SftError(f"{path}: YAML syntax error{where}: {problem}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise SftError(f"{path}: the top level must be a mapping of recipe keys, not {type(values).__name__}")
    return values


def _parse_overrides(overrides: list[str]) -> dict:
    """Turn `key=value` arguments into a nested mapping (values parsed as YAML)."""
    merged: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise SftError(f"override '{item}': expected key=value, e.g. optim.lr=3e-5")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = merged
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SftError(f"override '{item}': '{part}' is set to a value and also used as a mapping")
        node[parts[-1]] = value
    return merged


def _deep_merge(base: dict, extra: dict) -> dict:
    """Merge `extra` into a copy of `base`, recursing into mappings."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _is_env_only_interpolation(values: Any) -> bool:
    """Allow `${...}` interpolation only to recipe keys and `oc.env`; no other resolvers."""
    if isinstance(values, dict):
        return all(_is_env_only_interpolation(v) for v in values.values())
    if isinstance(values, list):
        return all(_is_env_only_interpolation(v) for v in values)
    if isinstance(values, str) and "${" in values:
        inner = values.split("${", 1)[1]
        return ":" not in inner.split("}", 1)[0] or inner.startswith("oc.env:")
    return True


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read, merge and validate a recipe; every failure is an SftError naming the key or file."""
    source = str(path)
    values = _deep_merge(_read_yaml(Path(path)), _parse_overrides(overrides or []))
    _check_keys(values, Recipe, "", source)
    if not _is_env_only_interpolation(values):
        raise SftError(f"{source}: only ${{key}} and ${{oc.env:VAR}} interpolations are allowed")
    schema = OmegaConf.structured(Recipe)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.create(values))
        OmegaConf.resolve(merged)
        recipe: Recipe = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        value = getattr(err, "value", None)
        message = str(err).splitlines()[0]
        if "Value" in message and key != "?":
            message = f"'{key}' expects {_field_type(key)}, got {value!r}"
        raise SftError(f"{source}: {message}") from None
    validate(recipe, source)
    return recipe


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


def to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (what the run directory records)."""
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def to_dict(recipe: Recipe) -> dict:
    """The resolved recipe as plain Python containers."""
    container = OmegaConf.to_container(OmegaConf.structured(recipe))
    assert isinstance(container, dict)
    return container


__all__ = ["Recipe", "load_recipe", "validate", "to_yaml", "to_dict"]
