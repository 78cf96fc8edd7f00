"""Config dataclasses to and from JSON: one schema for Python, the CLI and config files.

`config_to_dict(cfg)` gives plain JSON values (tuples as lists, paths as strings, nested configs
as objects); `config_from_dict(Cls, d)` reads them back, checking every key and value type, so
`config_from_dict(Cls, config_to_dict(cfg)) == cfg`. A field's `metadata={"help": ...}` is its
one-line description (`qprobe.cli.config_options` turns the fields into command-line options).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

from qprobe.errors import ConfigError

C = TypeVar("C")


def config_fields(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    """(field, resolved type) of each field of the dataclass `cls`, in order."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(X, True) for `X | None`, else (tp, False)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The JSON form of a config dataclass (nested configs included)."""
    return {f.name: _to_json(getattr(cfg, f.name)) for f, _ in config_fields(type(cfg))}


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def config_from_dict(cls: type[C], data: dict[str, Any], where: str = "") -> C:
    """A `cls` from its JSON form; missing keys take the field defaults, unknown keys are refused."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"expected {where} to be a JSON object, got {type(data).__name__}")
    known = config_fields(cls)
    names = [f.name for f, _ in known]
    unknown = sorted(set(data) - set(names))
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "remove or rename them"
        raise ConfigError(f"expected keys of {where} among {names}, got unknown {unknown}; {hint}")
    values = {f.name: _from_json(tp, data[f.name], f"{where}.{f.name}") for f, tp in known if f.name in data}
    missing = [f.name for f, _ in known if f.name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"expected a value for {', '.join(f'{where}.{m}' for m in missing)}, got none")
    return cls(**values)


def _from_json(tp: Any, value: Any, where: str) -> Any:
    inner, optional = unwrap_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"expected a value for {where}, got null")
    tp = inner
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if is_config(tp):
        return config_from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected {where} to be a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return tuple(_from_json(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"expected {where} to be an object, got {value!r}")
        return dict(value)
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"expected {where} to be a path (a string), got {value!r}")
        return Path(value)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"expected {where} among {list(typing.get_args(tp))}, got {value!r}")
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"expected {where} to be {getattr(tp, '__name__', tp)}, got {value!r}")
