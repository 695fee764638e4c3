"""Settings declared once: YAML/TOML files, presets, flags win, sources recorded, runtime keys, generated click options."""

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import click
import pytest
import yaml
from click.testing import CliRunner

from bbzo.cli.options import Argv, MappingParam, config_option, resolve_command, settings_options
from bbzo.config import (as_plain, differing, from_plain, load_config, resolve, runtime_keys, setting, setting_infos,
                         write_config)
from bbzo.errors import ConfigError


@dataclass
class Fit:
    PRESETS: ClassVar[dict] = {"quick": {"steps": 3, "lr": 0.3}, "slow": {"steps": 100}}

    preset: str = setting("quick", choices=("quick", "slow"), compare=False, help="Base values.")
    steps: int = setting(10, runtime=True, help="Steps.")
    lr: float = setting(0.1, help="Learning rate.")
    name: str = setting("run", help="A name.")
    cmd: Optional[list[str]] = setting(None, kind="argv", replaces=("script",), help="A program.")
    script: Optional[str] = setting(None, replaces=("cmd",), help="A script.")
    kwargs: dict = setting(default_factory=dict, help="Options.")
    res: tuple[float, ...] = setting((1.0, 2.0), help="Numbers.")
    fast: bool = setting(False, help="Go fast.")
    out: Path = setting(Path("o"), kind="path", runtime=True, help="Folder.")

    def __post_init__(self):
        if self.steps < 0:
            raise ConfigError(f"steps must be >= 0, got {self.steps}.")


@click.command("fit")
@config_option
@settings_options(Fit)
@click.pass_context
def fit(ctx, config, **_):
    s, sources = resolve_command(ctx, Fit)
    write_config(s.out, as_plain(s), sources)
    click.echo(repr((s.steps, s.lr, s.name, s.cmd, s.kwargs, s.fast, s.res)))


def run(*args):
    return CliRunner().invoke(fit, list(map(str, args)))


def test_yaml_and_toml_load_and_bad_files_are_config_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("steps: 3\nmax-queries: 1000\n")
    (tmp_path / "a.toml").write_text('steps = 3\ncmd = ["awk", "-f", "x.awk"]\n')
    assert load_config(tmp_path / "a.yaml") == {"steps": 3, "max-queries": 1000}
    assert load_config(tmp_path / "a.toml") == {"steps": 3, "cmd": ["awk", "-f", "x.awk"]}
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == {}
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "a.ini").write_text("x=1")
    with pytest.raises(ConfigError, match="unknown format"):
        load_config(tmp_path / "a.ini")


def test_layers_default_preset_file_flag_and_their_sources(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("preset: slow\nlr: 0.5\nkwargs: {k: 2}\nres: 3,4.5\n")
    s, src = resolve(Fit, {"name": "x"}, cfg, "fit")
    assert (s.steps, s.lr, s.name, s.kwargs, s.res) == (100, 0.5, "x", {"k": 2}, (3.0, 4.5))
    assert src["steps"] == "preset slow" and src["lr"] == "config" and src["name"] == "command line"
    assert src["fast"] == "default"
    s, src = resolve(Fit, {"preset": "quick", "steps": 7})
    assert (s.steps, s.lr) == (7, 0.3) and src["lr"] == "preset quick"
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        resolve(Fit, {"preset": "huge"})
    with pytest.raises(ConfigError, match="steps must be >= 0"):  # the dataclass validates
        resolve(Fit, {"steps": -1})


def test_config_fills_options_and_command_line_flags_win(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"steps: 5\nlr: 0.5\ncmd: [sim, --fast, 'a b']\nkwargs: {{k: 2}}\nfast: true\nout: {tmp_path / 'o'}\n")
    r = run("--config", cfg)
    assert r.exit_code == 0, r.output
    assert r.output.strip() == repr((5, 0.5, "run", ["sim", "--fast", "a b"], {"k": 2}, True, (1.0, 2.0)))
    r = run("--steps", 7, "--config", cfg, "--cmd", "other 'x y'", "--res", "9,8")  # order does not matter
    assert r.exit_code == 0, r.output
    assert r.output.strip() == repr((7, 0.5, "run", ["other", "x y"], {"k": 2}, True, (9.0, 8.0)))
    saved = (tmp_path / "o" / "config.resolved.yaml").read_text()
    assert "steps: 7  # from command line" in saved and "lr: 0.5  # from config" in saved
    assert "name: run\n" in saved  # defaults are saved too, without a source comment
    values = yaml.safe_load(saved)
    assert values["cmd"] == ["other", "x y"] and values["kwargs"] == {"k": 2} and values["res"] == [9.0, 8.0]
    r2 = run("--config", tmp_path / "o" / "config.resolved.yaml")  # the resolved file reproduces the run
    assert r2.output == r.output


def test_a_flag_replaces_the_files_alternative(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("cmd: [sim]\n")
    s, src = resolve(Fit, {"script": "x.py"}, cfg)
    assert s.cmd is None and s.script == "x.py" and "overridden by --script" in src["cmd"]
    s, _ = resolve(Fit, {}, cfg)
    assert s.cmd == ["sim"]


def test_unknown_keys_sections_and_bad_values(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("stepz: 5\n")
    r = run("--config", cfg)
    assert r.exit_code != 0 and isinstance(r.exception, ConfigError)
    assert "unknown option 'stepz' for `bbzo fit`. Did you mean 'steps'?" in str(r.exception)
    cfg.write_text(f"fit:\n  steps: 4\n  out: {tmp_path}\nother:\n  steps: 9\n")  # a section per command
    r = run("--config", cfg)
    assert r.exit_code == 0 and r.output.startswith("(4, 0.3")  # lr from the default preset
    for text, message in [("steps: many\n", "'many' is not a valid integer"), ("lr: [1]\n", "not a valid number"),
                          ("fast: maybe\n", "not a valid boolean"), ("res: a,b\n", "comma-separated numbers"),
                          ("preset: fastest\n", "unknown preset")]:
        cfg.write_text(text)
        with pytest.raises(ConfigError, match=message):
            resolve(Fit, {}, cfg)


def test_runtime_keys_and_differing_settings_round_trip():
    assert runtime_keys(Fit) == {"steps", "out", "preset"}
    a = as_plain(Fit())
    b = as_plain(Fit(steps=99, lr=0.2, out=Path("elsewhere")))
    assert differing(Fit, a, b) == ["lr"]  # steps and out may change; preset only selects
    assert from_plain(Fit, b) == Fit(steps=99, lr=0.2, out=Path("elsewhere"))
    with pytest.raises(ConfigError, match="unknown settings"):
        from_plain(Fit, {**a, "gone": 1})
    assert [i.name for i in setting_infos(Fit)][:3] == ["preset", "steps", "lr"]


def test_generated_options_have_help_and_types():
    r = CliRunner().invoke(fit, ["--help"])
    assert r.exit_code == 0
    for p in fit.params:
        assert p.help and p.opts[0] in r.output, p.name
    assert "[default: 10, or the preset]" in r.output
    r = run("--steps", "many")
    assert r.exit_code == 2 and "'many' is not a valid integer" in r.output


def test_argv_and_mapping_types():
    a, m = Argv(), MappingParam()
    assert a.convert("awk -f 'my sim.awk'", None, None) == ["awk", "-f", "my sim.awk"]
    assert a.convert(["./sim", 3], None, None) == ["./sim", "3"]
    for bad in ("", "awk 'unclosed", 5):
        with pytest.raises(click.BadParameter):
            a.convert(bad, None, None)
    assert m.convert("{n: 3, name: x}", None, None) == {"n": 3, "name": "x"}
    assert m.convert('{"n": [1, 2]}', None, None) == {"n": [1, 2]}
    assert m.convert("", None, None) == {}
    with pytest.raises(click.BadParameter, match="expected a mapping"):
        m.convert("[1, 2]", None, None)
