"""Load a recipe: YAML (strict), key=value overrides, unknown-key checks with "did you mean", typing.

The dataclasses (and every default) live in `schema.py`; range checks in `validation.py`. Loading fails
before any compute on an unknown key, a wrong type, or an out-of-range value.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sft_cli.config.schema import Recipe
from sft_cli.config.validation import validate
from sft_cli.errors import SftError


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


class _StrictLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key given twice in one mapping (YAML would keep the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise _DuplicateKey(f"key '{key}' is given twice (lines {seen[key]} and {line}) — keep one")
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


class _DuplicateKey(yaml.YAMLError):
    pass


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path) -> dict:
    """Parse the recipe file into a plain mapping, with line/column on syntax errors."""
    if not path.is_file():
        raise SftError(f"recipe file not found: {path} — check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SftError(f"{path}: not UTF-8 text — save the recipe as UTF-8") from None
    try:
        values = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as err:
        raise SftError(f"{path}: {err}") from None
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
        if ("Value" in message or "is not a ListConfig" in message) and key != "?":
            message = f"'{key}' expects {_field_type(key)}, got {value!r}"
        raise SftError(f"{source}: {message}") from None
    validate(recipe, source)
    return recipe


def to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (what the run directory records)."""
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def to_dict(recipe: Recipe) -> dict:
    """The resolved recipe as plain Python containers."""
    container = OmegaConf.to_container(OmegaConf.structured(recipe))
    assert isinstance(container, dict)
    return container


__all__ = ["Recipe", "load_recipe", "validate", "to_yaml", "to_dict"]
