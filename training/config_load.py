"""Reading and writing training configs: YAML files and ``key=value`` overrides (dotted keys, YAML
values: ``train.epochs=10``), every key and value type checked against :mod:`training.config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from smi_hub.fileio import atomic_write_text
from training.config import ConfigError, PretrainConfig
from training.config_checks import validate


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp`` or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}.")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(
                f"{key}: expected a mapping (section) but got {value!r}; write it as "
                f"'{key}: {{...}}' in YAML or set its fields with {key}.FIELD=VALUE."
            )
        return _build(tp, value, key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(
                f"{key}: expected a list of {_type_name(item_tp)} but got {value!r}; write "
                f"e.g. {key}=[1,2,3]."
            )
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping but got {value!r}.")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false but got {value!r}.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer but got {value!r}.")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads '1e-4' (no dot) as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number but got {value!r}.")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string but got {value!r}.")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        full = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" Did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else ""
            raise ConfigError(
                f"Unknown config key '{full}'.{hint} Valid keys here: {', '.join(names)}."
            )
        kwargs[k] = _coerce(v, hints[k], full)
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=0.1", "loss.name=vicreg"]`` -> nested dict with YAML-parsed values."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"Override {item!r} is not KEY=VALUE; write e.g. train.epochs=10 (no spaces "
                "around '=')."
            )
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"Override {item!r} has an empty key.")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"Override {item!r}: value is not valid YAML ({e}).") from e
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override {item!r} conflicts with another override of {part}.")
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "kwargs":
            out[k] = _merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> PretrainConfig:
    """Read a YAML config (or start from defaults), apply ``key=value`` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"Config file {p} not found; see training/configs/ for examples.")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p} must hold a YAML mapping of config sections.")
        data = loaded
    data = _merge(data, parse_overrides(overrides or []))
    return validate(_build(PretrainConfig, data))


def config_from_dict(data: dict[str, Any]) -> PretrainConfig:
    """Rebuild a config saved in a checkpoint or ``config.yaml``."""
    return validate(_build(PretrainConfig, data))


def save_config(cfg: PretrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
