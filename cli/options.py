"""Click options generated from a task's settings dataclass (:mod:`bbzo.config`), and ``--config``.

Every option defaults to "not given" so that :func:`bbzo.config.resolve` can layer defaults, the
preset, the ``--config`` file and the flags, and record where each value came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import click

from bbzo.config import RESOLVED_NAME, SettingInfo, parse_argv, parse_mapping, resolve, setting_infos
from bbzo.errors import ConfigError

__all__ = ["settings_options", "config_option", "resolve_command", "Argv", "MappingParam", "CommaList"]


class Argv(click.ParamType):
    """An argument list: a YAML list from a config file, or a string split like a POSIX shell (``shlex``).

    Never run through a shell: ``"awk -f 'my sim.awk'"`` becomes ``["awk", "-f", "my sim.awk"]``.
    """

    name = "ARGV"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Optional[list[str]]:
        if value is None:
            return None
        try:
            return parse_argv(value, "the value")
        except ConfigError as e:
            self.fail(str(e), param, ctx)


class MappingParam(click.ParamType):
    """Keyword arguments: a mapping from a config file, or a YAML/JSON flow mapping string ``'{k: 1}'``."""

    name = "MAPPING"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> dict[str, Any]:
        try:
            return parse_mapping(value, "the value")
        except ConfigError as e:
            self.fail(str(e), param, ctx)


class CommaList(click.ParamType):
    """``a,b,c`` -> a tuple (of floats / ints with ``cast=float`` / ``int``)."""

    def __init__(self, cast: Any = None, choices: Optional[Sequence[str]] = None) -> None:
        self.cast, self.choices = cast, tuple(choices) if choices else None
        self.name = "X,Y,..." if cast else "A,B,..."

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> tuple:
        if isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [x.strip() for x in str(value).split(",") if x.strip()]
        if not items:
            self.fail("give at least one value", param, ctx)
        if self.cast is not None:
            try:
                return tuple(self.cast(x) for x in items)
            except ValueError:
                self.fail(f"{value!r}: give comma-separated numbers, e.g. 97.7,390.6", param, ctx)
        out = tuple(str(x) for x in items)
        if self.choices:
            bad = [x for x in out if x not in self.choices]
            if bad:
                self.fail(f"{bad[0]!r} is not one of {', '.join(self.choices)}", param, ctx)
        return out


def _click_type(info: SettingInfo) -> Any:
    k = info.kind
    if info.choices is not None and k in ("str", "int", "float"):
        return click.Choice([str(c) for c in info.choices])
    return {"int": click.INT, "float": click.FLOAT, "str": click.STRING, "path": click.Path(path_type=Path),
            "argv": Argv(), "mapping": MappingParam(), "floats": CommaList(float), "ints": CommaList(int),
            "strs": CommaList(choices=info.choices)}.get(k, click.STRING)


def _help(info: SettingInfo, presets: bool) -> str:
    text = info.help or info.name.replace("_", " ")
    if info.kind == "bool":
        return text
    if info.default is not None and info.default != {} and info.default != ():
        d = info.default
        shown = ",".join(map(str, d)) if isinstance(d, (list, tuple)) else d
        text += f"  [default: {shown}{', or the preset' if presets else ''}]"
    return text


def settings_options(cls: type, exclude: Sequence[str] = (), only: Optional[Sequence[str]] = None
                     ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator adding one option per setting of ``cls`` (``--max-queries`` for ``max_queries``)."""
    infos = [i for i in setting_infos(cls) if i.cli and i.name not in exclude and (only is None or i.name in only)]
    presets = bool(getattr(cls, "PRESETS", None))

    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        for info in reversed(infos):
            kw: dict[str, Any] = {"help": _help(info, presets and info.name != "preset"), "default": None}
            if info.metavar:
                kw["metavar"] = info.metavar
            if info.kind == "bool":
                f = click.option(info.flag, info.name, is_flag=True, default=None, help=kw["help"])(f)
            else:
                f = click.option(info.flag, info.name, type=_click_type(info), **kw)(f)
        return f

    return deco


def config_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--config FILE``: the file's values fill in what the flags do not give."""
    return click.option(
        "--config", type=click.Path(dir_okay=False), default=None,
        help="YAML/TOML file of setting values (keys as the long option names, e.g. max_queries: 1000000); "
             f"options given on the command line override it. The values used are saved as {RESOLVED_NAME} in "
             "the run folder, which re-runs the same thing when passed back with --config.",
    )(f)


def resolve_command(ctx: click.Context, cls: type, command: Optional[str] = None,
                    overrides: Optional[dict[str, Any]] = None,
                    defaults: Optional[dict[str, Any]] = None) -> tuple[Any, dict[str, str]]:
    """``(settings, sources)`` for a click command built with :func:`settings_options` and :func:`config_option`."""
    names = {i.name for i in setting_infos(cls)}
    given = {n: v for n, v in ctx.params.items() if n in names
             and ctx.get_parameter_source(n) in (click.core.ParameterSource.COMMANDLINE,
                                                 click.core.ParameterSource.ENVIRONMENT)}
    return resolve(cls, given, ctx.params.get("config"), command or ctx.command.name, overrides, defaults)
