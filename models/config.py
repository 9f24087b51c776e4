"""Frozen dataclass configs with one home for every default, plus YAML and CLI overrides.

Each field's `metadata["help"]` documents it once; `add_arguments` turns the fields into argparse
options (so `--help` lists every option with its default) and `build_config` merges defaults, a YAML
file and CLI values, rejecting unknown keys and ill-typed values with a `ConfigError`.

    cfg = build_config(TrainConfig, yaml_path="train.yaml", overrides={"max_steps": 30})
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from models.errors import ConfigError


def field(default, help: str, **kw):  # noqa: A002 - mirrors argparse's name
    if isinstance(default, list | dict | set):
        raise TypeError("use tuples for sequence defaults (configs are frozen)")
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _coerce(name: str, tp, value):
    """Convert a YAML/CLI value to the field's annotated type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, inner[0], value)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return tuple(_coerce(name, args[0], v) for v in items if v != "")
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return value
    try:
        if tp is float and isinstance(value, int | float | str):
            return float(value)
        if tp is int and (isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit())):
            return int(value)
        if tp is str and isinstance(value, str | int | float | Path):
            return str(value)
    except ValueError as err:
        raise ConfigError(f"{name}: {err}") from None
    raise ConfigError(f"{name}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def build_config(cls, yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """Defaults < YAML file < overrides. Unknown keys are errors."""
    values: dict[str, Any] = {}
    if yaml_path:
        loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{yaml_path}: expected a mapping of option: value")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}")
    return cls(**{k: _coerce(k, hints[k], v) for k, v in values.items()})


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One `--kebab-name` option per field, defaulting to None so YAML values are not overridden."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else None
        shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        flag = {"nargs": "?", "const": True} if tp is bool else {}  # `--fsdp` alone means `--fsdp true`
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            choices=choices,
            metavar=None if choices else f.name.upper(),
            help=f"{f.metadata.get('help', '')} (default: {shown})",
            **flag,
        )


def config_from_args(cls, args: argparse.Namespace, yaml_attr: str = "config"):
    names = {f.name for f in dataclasses.fields(cls)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    return build_config(cls, getattr(args, yaml_attr, None), overrides)


def to_yaml(cfg) -> str:
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    return yaml.safe_dump(data, sort_keys=False)
