"""Strict YAML configs.

A config is a YAML mapping of sections; each section is a dataclass owned by the module that uses it
(registered in SECTIONS). Loading is strict: an unknown key (a typo) or a value of the wrong type is a
one-line error naming the file and the dotted key, raised before any work starts.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from minwm.errors import MinwmError

# section name -> "module:Dataclass". Each owning module defines its own section.
SECTIONS: dict[str, str] = {
    "actions": "minwm.cameras.actions:ActionConfig",
    "data": "minwm.data.clips:DataConfig",
    "model": "minwm.models.config:ModelConfig",
    "train": "minwm.train.trainer:TrainConfig",
    "codec": "minwm.codecs.config:CodecConfig",
    "inference": "minwm.inference.config:InferenceConfig",
    "bench": "minwm.bench.latency:BenchConfig",
    "stages": "minwm.stages.config:StagesConfig",
}


def section_class(name: str) -> type:
    module, cls = SECTIONS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except MinwmError as e:
                errors.append(str(e))
        raise MinwmError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise MinwmError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return type(value)(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)) if origin is list \
            else tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise MinwmError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MinwmError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MinwmError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise MinwmError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise MinwmError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MinwmError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise MinwmError(f"{where}.{unknown[0]}: unknown key (expected one of: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise MinwmError(f"{where}: {e}") from None


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


class Config(dict):
    """Section name -> section dataclass, plus `path` (where it was read from, for messages)."""

    path: str = "<config>"

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self) -> dict:
        return {k: to_dict(v) for k, v in self.items()}

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def parse_config(data: dict | None, where: str = "<config>") -> Config:
    data = data or {}
    if not isinstance(data, dict):
        raise MinwmError(f"{where}: expected a mapping of sections at the top level")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise MinwmError(f"{where}: unknown section '{unknown[0]}' (expected one of: {', '.join(sorted(SECTIONS))})")
    cfg = Config()
    cfg.path = where
    for name in SECTIONS:
        cfg[name] = from_dict(section_class(name), data.get(name), f"{where}: {name}")
    return cfg


def load_config(path: str | Path, overrides: dict | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise MinwmError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise MinwmError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if overrides:
        data = _deep_merge(data or {}, overrides)
    return parse_config(data, str(path))


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
