"""Command-line options made from the fields of a config dataclass, and the config they build.

Each field becomes `--field-name` (or its `metadata["flag"]`), typed from its annotation, with the
field's default and `metadata["help"]`; nested config fields (e.g. `sampling: SamplingConfig`) are
flattened into their own fields' options. `tuple[...]` fields repeat (`--feature A --feature B`),
`dict` fields take KEY=VALUE (`--task-option data=x.jsonl`). The values come, in order of
precedence, from the command line, a `--config FILE.json` (the dataclass's JSON form), and the
field defaults; `--dump-config` prints that JSON and exits.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import click
from click.core import ParameterSource

from qprobe.cli.options import parse_kv
from qprobe.core.config import config_fields, config_from_dict, config_to_dict, is_config, unwrap_optional
from qprobe.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C")


@dataclasses.dataclass(frozen=True)
class FieldOption:
    """One command-line option and the config field (a path through nested configs) it sets."""

    param: str  # click's parameter name
    flag: str
    path: tuple[str, ...]
    kind: str  # "value", "multiple" or "kv"
    required: bool


def field_options(cls: type) -> list[FieldOption]:
    out: list[FieldOption] = []
    for f, tp in config_fields(cls):
        inner, _ = unwrap_optional(tp)
        if is_config(inner):
            out += [dataclasses.replace(o, path=(f.name, *o.path)) for o in field_options(inner)]
            continue
        origin = getattr(inner, "__origin__", None)
        kind = "multiple" if origin is tuple else "kv" if (origin is dict or inner is dict) else "value"
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        out.append(FieldOption(f.name, flag, (f.name,), kind, required))
    params = [o.param for o in out]
    clash = sorted({p for p in params if params.count(p) > 1})
    if clash:
        raise ValueError(f"{cls.__name__}: fields {clash} would share one command-line option")
    return out


META = "qprobe.config_fields"


def _keep(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Field options are not passed to the command function: their values wait in ctx.meta."""
    ctx.meta.setdefault(META, {})[param.name] = value
    return value


def given_values(ctx: click.Context) -> dict[str, Any]:
    """Field option -> value, for the field options given on the command line."""
    sources = {ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.PROMPT}
    return {k: v for k, v in ctx.meta.get(META, {}).items() if ctx.get_parameter_source(k) in sources}


def _click_option(cls: type, name: str) -> click.Option:
    f, tp = next((f, tp) for f, tp in _all_fields(cls) if f.name == name)
    inner, _ = unwrap_optional(tp)
    origin = getattr(inner, "__origin__", None)
    flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
    help_text = f.metadata.get("help", "")
    default = f.default if f.default is not dataclasses.MISSING else None
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    common: dict[str, Any] = {"expose_value": False, "callback": _keep}
    if origin is tuple:
        shown = ", ".join(default) if default else ""
        return click.Option([flag, f.name], multiple=True, help=help_text + (f" Default: {shown}." if shown else ""),
                            **common)
    if origin is dict or inner is dict:
        return click.Option([flag, f.name], multiple=True, metavar="KEY=VALUE", help=help_text, **common)
    if "choices" in f.metadata:
        ptype: Any = click.Choice(list(f.metadata["choices"]))
    elif origin is Literal:
        ptype = click.Choice([str(a) for a in typing.get_args(inner)])
    elif inner is Path:
        ptype = click.Path(path_type=Path)
    elif inner in (int, float, str, bool):
        ptype = inner
    else:
        raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for a field of type {inner!r}")
    if inner is bool:
        return click.Option([f"{flag}/--no-{flag[2:]}", f.name], default=default, show_default=True, help=help_text,
                            **common)
    return click.Option([flag, f.name], type=ptype, default=default, show_default=default is not None,
                        help=help_text + (" Required (here or in --config)." if default is None and
                                          f.default is dataclasses.MISSING else ""), **common)


def _all_fields(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    out = []
    for f, tp in config_fields(cls):
        inner, _ = unwrap_optional(tp)
        out += _all_fields(inner) if is_config(inner) else [(f, tp)]
    return out


def config_options(cls: type) -> Callable[[F], F]:
    """Decorator: add an option per field of `cls` (and its nested configs), plus --config and --dump-config."""

    def decorate(fn: F) -> F:
        params: list[click.Parameter] = [
            click.Option(["--config", "config_file"], type=click.Path(path_type=Path, dir_okay=False), default=None,
                         help=f"A JSON file of {cls.__name__} fields (what --dump-config prints, or a run's "
                              "manifest.json, whose \"config\" it takes); options given here override it."),
            click.Option(["--dump-config"], is_flag=True, help="Print the config as JSON and exit (nothing is run)."),
        ]
        params += [_click_option(cls, o.param) for o in field_options(cls)]
        fn.__click_params__ = getattr(fn, "__click_params__", []) + params[::-1]  # type: ignore[attr-defined]
        return fn

    return decorate


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"expected --config to name a readable JSON file, got '{path}' ({exc})") from None
    if isinstance(data, dict) and "format_version" in data and "config" in data:
        data = data["config"]  # a run's manifest.json
    if not isinstance(data, dict):
        raise ConfigError(f"expected --config '{path}' to hold a JSON object, got {type(data).__name__}")
    return data


def config_from_cli(cls: type[C], ctx: click.Context, base: dict[str, Any] | None = None) -> C:
    """The config: the command line over `base` (e.g. the --config file) over the field defaults."""
    values: dict[str, Any] = json.loads(json.dumps(base or {}))
    given = given_values(ctx)
    for o in field_options(cls):
        node = values
        for key in o.path[:-1]:
            node = node.setdefault(key, {})
        if o.param in given:
            value = given[o.param]
            if o.kind == "kv":
                node[o.path[-1]] = {**node.get(o.path[-1], {}), **parse_kv(value, o.flag)}
            elif o.kind == "multiple":
                node[o.path[-1]] = list(value)
            else:
                node[o.path[-1]] = value.as_posix() if isinstance(value, Path) else value
        elif o.required and o.path[-1] not in node:
            raise ConfigError(f"expected {o.flag} (or \"{'.'.join(o.path)}\" in a --config file), got neither")
    return config_from_dict(cls, values)


def dump_config(cfg: Any) -> str:
    return json.dumps(config_to_dict(cfg), indent=2) + "\n"
