"""Task settings declared once, as typed dataclasses, and layered: default < preset < config file < flag.

A task declares its settings as a dataclass whose fields are made with :func:`setting` (a default,
help text, choices, whether the value may change when a run is resumed). Everything else comes from
that one declaration:

* the command-line options (generated in :mod:`bbzo.cli.options`; no click code lives in the engine);
* ``--config run.yaml`` -- a flat mapping of setting names (``max_queries`` or ``max-queries``), or one
  section per command (``train: {...}``); unknown keys are an error that suggests the closest name;
* presets -- ``PRESETS: ClassVar[dict[str, dict]]`` on the class, chosen by a ``preset`` setting;
* the saved ``config.resolved.yaml`` -- every value used, with its source as a comment; feeding it back
  with ``--config`` reproduces the run;
* the run-folder policy -- :func:`differing` names the settings in which two runs differ, skipping
  those declared ``runtime=True`` (they may change on ``--resume``: more steps, another device).

:func:`resolve` applies the layers and returns the settings and the source of each value.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import shlex
import typing
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import yaml

from .checkpoint import atomic_write_bytes
from .errors import ConfigError

__all__ = ["setting", "SettingInfo", "setting_infos", "resolve", "coerce", "parse_argv", "parse_mapping",
           "load_config", "file_values",
           "as_plain", "from_plain", "differing", "runtime_keys", "write_config", "RESOLVED_NAME"]

RESOLVED_NAME = "config.resolved.yaml"


def setting(default: Any = MISSING, *, help: str, choices: Optional[Sequence[Any]] = None, runtime: bool = False,
            default_factory: Any = MISSING, replaces: Sequence[str] = (), kind: Optional[str] = None,
            metavar: Optional[str] = None, compare: bool = True, cli: bool = True) -> Any:
    """A dataclass field that is a task setting.

    Args:
        default / default_factory: The default value (as ``dataclasses.field``).
        help: One-line help (the ``--help`` text of its flag).
        choices: Allowed values (the flag becomes a choice).
        runtime: May change when a run is resumed or evaluated (steps, device, checkpoint interval...).
        replaces: Settings that belong to this one: when this one is given on the command line, their
            values from a config file are dropped (``--oracle`` replaces the file's ``oracle_cmd``).
        kind: Override the kind derived from the type: ``argv`` (a program's argument list, split like a
            shell line), ``mapping`` (YAML flow mapping), ``floats`` / ``strs`` (comma-separated).
        metavar: Shown in ``--help``.
        compare: False for settings that only select others (``preset``): not compared between runs.
        cli: False for settings that only come from files and code.
    """
    meta = {"bbzo": {"help": help, "choices": tuple(choices) if choices is not None else None, "runtime": runtime,
                     "replaces": tuple(replaces), "kind": kind, "metavar": metavar, "compare": compare, "cli": cli}}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class SettingInfo:
    """One setting of a settings dataclass, as the CLI and the config layers see it."""

    name: str
    kind: str
    optional: bool
    default: Any
    help: str
    choices: Optional[tuple]
    runtime: bool
    replaces: tuple
    metavar: Optional[str]
    compare: bool
    cli: bool

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _kind_of(tp: Any) -> tuple[str, bool]:
    optional = False
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else Any
        origin = typing.get_origin(tp)
    if tp is bool:
        return "bool", optional
    if tp is int:
        return "int", optional
    if tp is float:
        return "float", optional
    if tp is str:
        return "str", optional
    if tp is Path:
        return "path", optional
    if origin in (dict, Mapping) or tp is dict:
        return "mapping", optional
    if origin in (tuple, list, Sequence):
        args = typing.get_args(tp)
        inner = args[0] if args else str
        return {float: "floats", int: "ints"}.get(inner, "strs"), optional
    return "any", optional


@functools.lru_cache(maxsize=None)
def setting_infos(cls: type) -> tuple[SettingInfo, ...]:
    """The settings of a dataclass, in declaration order (fields made without :func:`setting` count too)."""
    if not dataclasses.is_dataclass(cls):
        raise ConfigError(f"{cls.__name__} is not a dataclass of settings.")
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("bbzo", {})
        kind, optional = _kind_of(hints.get(f.name, Any))
        kind = meta.get("kind") or kind
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        out.append(SettingInfo(f.name, kind, optional or default is None, default, meta.get("help", ""),
                               meta.get("choices"), bool(meta.get("runtime", False)), tuple(meta.get("replaces", ())),
                               meta.get("metavar"), bool(meta.get("compare", True)), bool(meta.get("cli", True))))
    return tuple(out)


def runtime_keys(cls: type) -> set[str]:
    """Settings that may change between a run and its resume (declared ``runtime=True``)."""
    return {i.name for i in setting_infos(cls) if i.runtime or not i.compare}


# ---------------------------------------------------------------------------- values
def _fail(where: str, info: SettingInfo, value: Any, what: str) -> ConfigError:
    return ConfigError(f"{where}: {info.name}: {value!r} is not a valid {what}.")


def parse_argv(value: Any, where: str = "argv") -> list[str]:
    """A program's argument list from a list, or a string split like a POSIX shell line (never run by one)."""
    if isinstance(value, (list, tuple)):
        out = [str(v) for v in value]
    elif isinstance(value, str):
        try:
            out = shlex.split(value)
        except ValueError as e:
            raise ConfigError(f"{where}: cannot split {value!r} into arguments: {e}") from None
    else:
        raise ConfigError(f"{where}: expected a string or a list of arguments, got {type(value).__name__}.")
    if not out:
        raise ConfigError(f"{where}: the argument list is empty.")
    return out


def parse_mapping(value: Any, where: str = "mapping") -> dict[str, Any]:
    """Keyword arguments from a mapping, or a YAML/JSON flow mapping string ``'{k: 1}'`` ('' and None: empty)."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value) if value.strip() else {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: {value!r} is not a YAML/JSON mapping: {str(e).splitlines()[0]}") from None
        value = {} if value is None else value
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping like '{{name: value}}', got {value!r}.")
    return {str(a): b for a, b in value.items()}


def coerce(info: SettingInfo, value: Any, where: str = "setting") -> Any:
    """``value`` (from a file, a flag or a preset) as the setting's type; a clear ConfigError otherwise."""
    if value is None:
        if info.optional or info.kind == "any":
            return None
        raise ConfigError(f"{where}: {info.name} needs a value (it has no 'none').")
    k = info.kind
    try:
        if k == "bool":
            if isinstance(value, bool):
                out: Any = value
            elif isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
                out = value.lower() in ("true", "yes", "1", "on")
            else:
                raise _fail(where, info, value, "boolean")
        elif k in ("int", "float"):
            cast, what = (int, "integer") if k == "int" else (float, "number")
            if isinstance(value, bool) or (k == "int" and isinstance(value, float) and not value.is_integer()):
                raise _fail(where, info, value, what)
            try:
                out = cast(value)
            except (TypeError, ValueError):
                raise _fail(where, info, value, what) from None
        elif k == "str":
            if isinstance(value, (dict, list, tuple)):
                raise _fail(where, info, value, "string")
            out = str(value)
        elif k == "path":
            out = Path(value)
        elif k == "argv":
            out = parse_argv(value, f"{where}: {info.name}")
        elif k == "mapping":
            out = parse_mapping(value, f"{where}: {info.name}")
        elif k in ("floats", "ints", "strs"):
            items = [x.strip() for x in value.split(",") if x.strip()] if isinstance(value, str) else \
                list(value) if isinstance(value, (list, tuple)) else [value]
            if k in ("floats", "ints"):
                cast = float if k == "floats" else int
                try:
                    out = tuple(cast(x) for x in items)
                except (TypeError, ValueError):
                    raise ConfigError(f"{where}: {info.name}: {value!r}: give comma-separated numbers, e.g. "
                                      f"{'97.7,390.6' if k == 'floats' else '16,16'}") from None
            else:
                out = tuple(str(x) for x in items)
            if not out:
                raise ConfigError(f"{where}: {info.name}: give at least one value.")
        else:
            out = value
    except ConfigError:
        raise
    if info.choices is not None and out not in info.choices and not (isinstance(out, tuple) and set(out) <= set(info.choices)):
        raise ConfigError(f"{where}: {info.name}: {value!r} is not one of {', '.join(map(str, info.choices))}.")
    return out


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


def file_values(path: Union[str, Path], cls: type, command: Optional[str] = None,
                ignore: Sequence[str] = ()) -> dict[str, Any]:
    """The settings a config file gives (keys normalised, the command's section taken if present)."""
    data = load_config(path)
    section = data.get(command) if command else None
    if isinstance(section, dict):  # a file with one section per command
        data = section
    names = {i.name for i in setting_infos(cls)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_").lstrip("_")
        if name in ignore:
            continue
        if name not in names:
            close = difflib.get_close_matches(name, sorted(names), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"config file {str(path)!r}: unknown option {key!r} for `bbzo {command or cls.__name__}`."
                              f"{hint} Valid keys: {', '.join(sorted(names))}.")
        out[name] = value
    return out


def resolve(cls: type, cli: Optional[Mapping[str, Any]] = None, config_file: Optional[Union[str, Path]] = None,
            command: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None,
            defaults: Optional[Mapping[str, Any]] = None) -> tuple[Any, dict[str, str]]:
    """Settings of ``cls`` from its defaults, its preset, a config file and command-line values.

    Args:
        cli: Values given on the command line (only those actually given).
        config_file: A YAML/TOML file of settings (flat or with a ``command`` section).
        overrides: Values set by code (after everything else; source ``code``).
        defaults: Command-specific defaults that replace the dataclass's (below every other layer).
    Returns:
        ``(settings, sources)``: the dataclass instance and, per setting, ``default`` / ``preset NAME`` /
        ``config`` / ``command line`` (with a note where a flag dropped a file's value).
    """
    infos = {i.name: i for i in setting_infos(cls)}
    cli = dict(cli or {})
    filed = file_values(config_file, cls, command) if config_file else {}
    values: dict[str, Any] = {n: i.default for n, i in infos.items()}
    for k, v in (defaults or {}).items():
        values[k] = coerce(infos[k], v, "default")
    sources: dict[str, str] = {n: "default" for n in infos}
    presets: Mapping[str, Mapping[str, Any]] = getattr(cls, "PRESETS", {}) or {}
    if presets and "preset" in infos:
        name = cli.get("preset", filed.get("preset", values["preset"]))
        if name not in presets:
            raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(presets)}.")
        for k, v in presets[name].items():
            values[k] = coerce(infos[k], v, f"preset {name}")
            sources[k] = f"preset {name}"
    where = f"config file {str(config_file)!r}"
    for k, v in filed.items():
        values[k] = coerce(infos[k], v, where)
        sources[k] = "config"
    for k, v in cli.items():
        values[k] = coerce(infos[k], v, f"--{k.replace('_', '-')}")
        sources[k] = "command line"
    for k in cli:
        for r in infos[k].replaces:
            if sources.get(r) == "config":
                values[r], sources[r] = infos[r].default, f"config, overridden by --{k.replace('_', '-')} on the command line"
    for k, v in (overrides or {}).items():
        values[k] = coerce(infos[k], v, "code")
        sources[k] = "code"
    return cls(**values), sources


# ---------------------------------------------------------------------------- plain form, comparison, files
def _plain(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def as_plain(settings: Any) -> dict[str, Any]:
    """The settings as a JSON/YAML-friendly dict (paths as strings, tuples as lists)."""
    return {i.name: _plain(getattr(settings, i.name)) for i in setting_infos(type(settings))}


def from_plain(cls: type, data: Mapping[str, Any], where: str = "saved settings") -> Any:
    """Rebuild settings saved with :func:`as_plain` (unknown keys are an error naming them)."""
    infos = {i.name: i for i in setting_infos(cls)}
    unknown = sorted(set(data) - set(infos))
    if unknown:
        raise ConfigError(f"{where}: unknown settings {unknown}; the run was written by another version of bbzo.")
    values = {n: (coerce(infos[n], data[n], where) if n in data else i.default) for n, i in infos.items()}
    return cls(**values)


def differing(cls: type, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Settings (by name) whose values differ between two plain dicts, except runtime ones.

    A setting the old record lacks (it was added to bbzo since) counts as its default there, so a run
    written before a new setting existed stays compatible as long as the new setting keeps its default.
    """
    skip = runtime_keys(cls)
    defaults = {i.name: _plain(i.default) for i in setting_infos(cls)}
    return sorted(k for k in new if k not in skip
                  and _plain(old.get(k, defaults.get(k))) != _plain(new.get(k)))


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

