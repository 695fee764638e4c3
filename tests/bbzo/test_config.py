"""Config files: YAML/TOML load, --config fills click defaults, flags win, the resolved config round-trips."""

from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from bbzo.config import Argv, MappingParam, config_option, load_config, write_resolved_config
from bbzo.errors import ConfigError


@click.command("fit")
@config_option
@click.option("--steps", type=int, default=10)
@click.option("--lr", type=float, default=0.1)
@click.option("--name", default="run")
@click.option("--cmd", type=Argv(), default=None)
@click.option("--kwargs", type=MappingParam(), default=None)
@click.option("--fast", is_flag=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("o"))
@click.pass_context
def fit(ctx, config, steps, lr, name, cmd, kwargs, fast, out):
    write_resolved_config(ctx, out)
    click.echo(repr((steps, lr, name, cmd, kwargs, fast)))


def run(*args):
    r = CliRunner().invoke(fit, list(args))
    return r


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


def test_config_fills_options_and_command_line_flags_win(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"steps: 5\nlr: 0.5\ncmd: [sim, --fast, 'a b']\nkwargs: {{k: 2}}\nfast: true\nout: {tmp_path / 'o'}\n")
    r = run("--config", str(cfg))
    assert r.exit_code == 0, r.output
    assert r.output.strip() == repr((5, 0.5, "run", ["sim", "--fast", "a b"], {"k": 2}, True))
    r = run("--steps", "7", "--config", str(cfg), "--cmd", "other 'x y'")  # order does not matter
    assert r.exit_code == 0, r.output
    assert r.output.strip() == repr((7, 0.5, "run", ["other", "x y"], {"k": 2}, True))
    saved = (tmp_path / "o" / "config.resolved.yaml").read_text()
    assert "steps: 7  # from command line" in saved and "lr: 0.5  # from config" in saved
    assert "name: run\n" in saved  # defaults are saved too, without a source comment
    # the resolved file reproduces the run when fed back
    values = yaml.safe_load(saved)
    assert values["cmd"] == ["other", "x y"] and values["kwargs"] == {"k": 2}
    r2 = run("--config", str(tmp_path / "o" / "config.resolved.yaml"))
    assert r2.output == r.output


def test_unknown_keys_and_sections(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("stepz: 5\n")
    r = run("--config", str(cfg))
    assert r.exit_code != 0 and isinstance(r.exception, ConfigError)
    assert "unknown option 'stepz' for `bbzo fit`. Did you mean 'steps'?" in str(r.exception)
    cfg.write_text(f"fit:\n  steps: 4\n  out: {tmp_path}\nother:\n  steps: 9\n")  # a section per command
    r = run("--config", str(cfg))
    assert r.exit_code == 0 and r.output.startswith("(4, 0.1")
    cfg.write_text("steps: many\n")
    r = run("--config", str(cfg))
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
