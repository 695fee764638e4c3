import json

from click.testing import CliRunner

import bbzo
from bbzo.cli.main import main


def test_help_and_version():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0 and "demo" in r.output and "estimators" in r.output
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and bbzo.__version__ in r.output
    r = CliRunner().invoke(main, ["demo", "--help"])
    assert r.exit_code == 0 and "--steps" in r.output and "--resume" in r.output


def test_list_commands():
    r = CliRunner().invoke(main, ["estimators"])
    assert r.exit_code == 0 and all(n in r.output for n in ("cge", "sparse_cge", "rge"))
    r = CliRunner().invoke(main, ["models"])
    assert r.exit_code == 0 and "resnet20" in r.output


def test_demo_trains_through_the_black_box_and_resumes(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--steps", "30", "--no-progress", "--no-plots", "--estimators", "cge"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())["results"][0]
    assert res["steps"] == 30 and res["queries"] == 30 * res["queries_per_step"]
    assert res["oracle_rows"] == res["queries"] * 64
    assert res["test_mae_m"] < 0.6 * res["test_mae_before_m"]
    assert "| cge |" in r.output
    # resuming a finished run does no more steps and reproduces the same policy
    r = CliRunner().invoke(main, args + ["--resume"])
    assert r.exit_code == 0, r.output
    res2 = json.loads((out / "results.json").read_text())["results"][0]
    assert res2["test_mae_m"] == res["test_mae_m"] and res2["queries"] == res["queries"]


def test_bbzo_errors_are_one_line_exit_2(tmp_path):
    r = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--estimators", "nope", "--no-progress"])
    assert r.exit_code == 2 and "unknown estimator" in r.output
