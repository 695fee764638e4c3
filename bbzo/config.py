"""Config files for every ``bbzo`` command (timm's layering): file fills defaults, flags override.

``@config_option`` adds ``--config FILE`` (YAML ``.yaml``/``.yml`` or TOML ``.toml``) to a click command.
The option is eager, so its callback runs before the others are parsed and puts the file's values in
``ctx.default_map``: click then takes a value from the command line if it was given there, else from
the file, else the option's default. ``ctx.get_parameter_source`` tells which one won, and
:func:`write_resolved_config` writes the values actually used as ``config.resolved.yaml`` into the run
folder, with the source of each non-default value as a comment. Feeding that file back with
``--config`` reproduces the run.

A config file is a flat mapping of option names (``max_queries`` or ``max-queries``), or holds one
section per command (``train: {...}``); unknown keys are an error that suggests the closest option.
"""

from __future__ import annotations

import difflib
import shlex
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import click
import yaml

from .checkpoint import atomic_write_bytes
from .errors import ConfigError

__all__ = ["load_config", "config_option", "resolved_config", "write_resolved_config", "write_config",
           "Argv", "MappingParam", "RESOLVED_NAME"]

RESOLVED_NAME = "config.resolved.yaml"


def load_config(path: Union[str, Path]) -> dict[str, Any]:
    """Read a YAML or TOML file into a dict (keys as written). Clear errors for missing or bad files."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found.")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # python 3.10
                try:
                    import tomli as tomllib  # type: ignore[no-redef]
                except ModuleNotFoundError:
                    raise ConfigError("TOML configs need Python >= 3.11 or `pip install tomli`; or use YAML.") from None
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml", ".json"):
            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"config file {str(path)!r}: unknown format {suffix!r}; use .yaml, .yml or .toml.")
    except ConfigError:
        raise
    except Exception as e:  # yaml.YAMLError, tomllib.TOMLDecodeError
        raise ConfigError(f"config file {str(path)!r} is not valid {suffix[1:].upper()}: {str(e).splitlines()[0]}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of option names, got {type(data).__name__}.")
    return data


def _option_names(cmd: click.Command) -> dict[str, click.Parameter]:
    return {p.name: p for p in cmd.params if p.name and p.name not in ("config", "help") and isinstance(p, click.Option)}


def _normalize(data: Mapping[str, Any], cmd: click.Command, path: str) -> dict[str, Any]:
    names = _option_names(cmd)
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_").lstrip("_")
        if name not in names:
            close = difflib.get_close_matches(name, list(names), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"config file {path!r}: unknown option {key!r} for `bbzo {cmd.name}`.{hint} "
                              f"Valid keys: {', '.join(sorted(names))}.")
        out[name] = value
    return out


def _load_into_default_map(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[str]:
    if not value:
        return value
    data = load_config(value)
    cmd_name = ctx.command.name or ""
    section = data.get(cmd_name)
    if isinstance(section, dict):  # a file with one section per command
        data = section
    ctx.default_map = {**(ctx.default_map or {}), **_normalize(data, ctx.command, str(value))}
    return value


def config_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--config FILE`` to a click command: the file's values become defaults, flags override."""
    return click.option(
        "--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=True,
        callback=_load_into_default_map,
        help="YAML/TOML file of option values (keys as the long option names, e.g. max_queries: 1000000); "
             "options given on the command line override it. The values used are saved as "
             f"{RESOLVED_NAME} in the run folder.",
    )(f)


def _plain(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def resolved_config(ctx: click.Context) -> tuple[dict[str, Any], dict[str, str]]:
    """``(values, sources)`` of every option of ``ctx.command``; sources are ``command line`` / ``config`` / ``default``."""
    values, sources = {}, {}
    for name in _option_names(ctx.command):
        if name not in ctx.params:
            continue
        values[name] = _plain(ctx.params[name])
        src = ctx.get_parameter_source(name)
        sources[name] = {click.core.ParameterSource.COMMANDLINE: "command line",
                         click.core.ParameterSource.DEFAULT_MAP: "config",
                         click.core.ParameterSource.ENVIRONMENT: "environment"}.get(src, "default")  # type: ignore[arg-type]
    return values, sources


def write_config(folder: Union[str, Path], values: Mapping[str, Any], sources: Optional[Mapping[str, str]] = None,
                 header: str = "", name: str = RESOLVED_NAME) -> Path:
    """Write ``values`` as YAML into ``folder/name`` (atomically), a comment per non-default value."""
    path = Path(folder) / name
    lines = [f"# {h}" for h in header.splitlines()] if header else []
    for key, value in values.items():
        value = _plain(value)
        if isinstance(value, (list, dict)):  # one line each: [awk, -f, sim.awk], {n: 2048}
            dumped = f"{key}: " + yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
        else:
            dumped = yaml.safe_dump({key: value}, default_flow_style=False, width=10**6).rstrip("\n")
        src = (sources or {}).get(key)
        if src and src != "default" and "\n" not in dumped:
            dumped += f"  # from {src}"
        lines.append(dumped)
    text = "\n".join(lines) + "\n"
    atomic_write_bytes(path, lambda f: f.write(text.encode()))
    path.chmod(0o644)  # a temp file is created 0600; a config is for reading and sharing
    return path


def write_resolved_config(ctx: click.Context, folder: Union[str, Path]) -> Path:
    """Save the options ``ctx`` ran with as ``folder/config.resolved.yaml`` (re-usable with ``--config``)."""
    values, sources = resolved_config(ctx)
    cfg_file = ctx.params.get("config")
    header = f"bbzo {ctx.command.name}: the options this run used" + (f" (config file: {cfg_file})" if cfg_file else "")
    header += f"\nre-run: bbzo {ctx.command.name} --config {Path(folder) / RESOLVED_NAME}"
    return write_config(folder, values, sources, header=header)


# ---------------------------------------------------------------------------- option types
class Argv(click.ParamType):
    """An argument list: a YAML list from a config file, or a string split like a POSIX shell (``shlex``).

    Never run through a shell: ``"awk -f 'my sim.awk'"`` becomes ``["awk", "-f", "my sim.awk"]``.
    """

    name = "ARGV"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Optional[list[str]]:
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            argv = [str(v) for v in value]
        elif isinstance(value, str):
            try:
                argv = shlex.split(value)
            except ValueError as e:
                self.fail(f"cannot split {value!r} into arguments: {e}", param, ctx)
        else:
            self.fail(f"expected a string or a list of arguments, got {type(value).__name__}", param, ctx)
        if not argv:
            self.fail("the argument list is empty", param, ctx)
        return argv


class MappingParam(click.ParamType):
    """Keyword arguments: a mapping from a config file, or a YAML/JSON flow mapping string ``'{k: 1}'``."""

    name = "MAPPING"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> dict[str, Any]:
        if value is None or value == "":
            return {}
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as e:
                self.fail(f"{value!r} is not a YAML/JSON mapping: {str(e).splitlines()[0]}", param, ctx)
            if value is None:
                return {}
        if not isinstance(value, dict):
            self.fail(f"expected a mapping like '{{name: value}}', got {value!r}", param, ctx)
        return {str(k): v for k, v in value.items()}
