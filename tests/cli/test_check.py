"""``bbzo check`` end to end: the heater config (awk program), the stochastic heater, a program alone, ZO-SOL."""

import json
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bbzo.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
FAKE = ROOT / "tests" / "oracles" / "fake_program.py"


def invoke(*args):
    return CliRunner().invoke(main, ["check", *map(str, args)])


def report(out):
    return json.loads((Path(out) / "check.json").read_text())


@pytest.mark.skipif(shutil.which("awk") is None, reason="needs awk")
def test_check_of_the_heater_config_prints_the_table_and_writes_json_and_plot(tmp_path):
    r = invoke("--config", ROOT / "examples/custom_simulator/run.yaml", "--out", tmp_path, "--no-progress",
               "--coords", 4, "--repeats", 3, "--explore", 8)
    assert r.exit_code == 0, r.output
    for key in ("determinism", "noise (parameters)", "step (parameters)", "step (model outputs)", "rows/s by call size",
                "2 copies", "queries per step", "input range", "findings:", "check.json"):
        assert key in r.output
    rep = report(tmp_path)
    assert rep["determinism"]["deterministic"] and not rep["determinism"]["accepts_seed"]
    assert rep["subject"]["params"] == 82 and rep["subject"]["oracle_kind"] == "program"
    conf = rep["step"]["parameters"]["plain"]["configured"]
    assert conf["mu"] == 0.001 and conf["side"] == "good" and conf["error"] < 0.05
    assert rep["step"]["model outputs"]["plain"].get("configured") is None  # cge is configured: mu is judged in parameters
    est = {e["estimator"]: e["queries"] for e in rep["estimators"]}
    assert est["cge"] == 83 and est["oracle_cge"] == 3 and est["sparse_cge"] == 10
    assert rep["cost"]["copies"]["copies"] == 2 and rep["input_range"]["failed"] == 0
    assert rep["provenance"]["commit"] and (tmp_path / "check.png").stat().st_size > 10_000
    assert "oracle_cmd: [examples/custom_simulator/heater.sh]  # from config" in (tmp_path / "config.resolved.yaml").read_text()


def test_check_of_the_stochastic_heater_finds_the_noise_and_the_seed(tmp_path):
    r = invoke("--config", ROOT / "examples/stochastic_simulator/run.yaml", "--out", tmp_path, "--no-progress",
               "--no-plots", "--coords", 3, "--repeats", 4, "--sections", "determinism,noise,step")
    assert r.exit_code == 0, r.output
    rep = report(tmp_path)
    det = rep["determinism"]
    assert not det["deterministic"] and det["accepts_seed"] and det["seeded"]["deterministic"]
    plain, crn = rep["step"]["parameters"]["plain"]["configured"], rep["step"]["parameters"]["crn"]["configured"]
    assert crn["error"] < 0.05 < 10 < plain["error"]  # mu = 1e-3: noise / mu without a shared seed, a gradient with one
    assert "train with common random numbers" in " ".join(r.output.split())


def test_a_program_alone_is_checked_on_a_box_and_its_failing_rows_are_named(tmp_path):
    cmd = f"{sys.executable} {FAKE} --mode nan_rows --threshold 0.7 --d-in 1"  # NaN where the input is above 0.7
    r = invoke("--oracle-cmd", cmd, "--input-range", "0,1", "--out", tmp_path, "--no-progress", "--no-plots",
               "--sections", "determinism,range", "--explore", 16)
    assert r.exit_code == 0, r.output
    rep = report(tmp_path)
    rng = rep["input_range"]
    assert rng["failed"] > 0 and all(ex["input"][0] > 0.7 for ex in rng["examples"])
    rule = [x for x in rng["rules"] if x.startswith("input[0] >")]
    assert rule and abs(float(rule[0].split(">")[1]) - 0.7) < 0.05
    assert "fails where input[0] >" in r.output and "rows failed" in r.output


def test_bad_input_is_one_clear_line(tmp_path):
    cmd = f"{sys.executable} {FAKE}"
    r = invoke("--oracle-cmd", cmd, "--out", tmp_path, "--no-progress")
    assert r.exit_code == 2 and "--rows" in r.output and "--input-range" in r.output
    r = invoke("--oracle-cmd", cmd, "--input-range", "0,1,2", "--out", tmp_path, "--no-progress")
    assert r.exit_code == 2 and "two numbers LO,HI" in r.output
    r = invoke("--out", tmp_path)
    assert r.exit_code == 2 and "no black box given" in r.output


def test_check_sol_on_a_tiny_grid_sweeps_the_corrector_in_the_loop_and_the_solver_alone(tmp_path):
    flags = ["--nx", 16, "--train-re", "195.3,3125", "--test-re", "781.3", "--warmup", 30, "--frames", 10,
             "--corrector", "tiny", "--unroll", 2, "--batch", 2, "--data-dir", tmp_path / "data", "--init", "scratch"]
    r = invoke("sol", *flags, "--out", tmp_path / "chk", "--no-progress", "--no-plots", "--coords", 3,
               "--mus", "1e-6,1e-5,1e-4,1e-3", "--repeats", 2, "--explore", 2, "--sections", "determinism,step,range")
    assert r.exit_code == 0, r.output
    rep = report(tmp_path / "chk")
    assert rep["determinism"]["deterministic"] or rep["determinism"]["composition_ulps"] < 64
    assert set(rep["step"]) == {"parameters", "oracle inputs"}
    assert rep["step"]["parameters"]["plain"]["configured"]["mu"] == 1e-4
    assert rep["subject"]["corrector"] == "tiny" and rep["input_range"]["groups"][0]["failed"] == 0


def test_check_defense_looks_at_the_classifier_through_the_denoisers_last_layer(tmp_path):
    import numpy as np
    import torch

    from tests.tasks.test_defense import TinyNet, images

    tx, ty = images(32, 0)
    vx, vy = images(8, 1)
    np.savez(tmp_path / "toy.npz", x_train=tx, y_train=ty, x_val=vx, y_val=vy)
    torch.manual_seed(0)
    torch.save(TinyNet().state_dict(), tmp_path / "clf.pt")
    r = invoke("defense", "--data", tmp_path / "toy.npz", "--classifier", "tests.tasks.test_defense:TinyNet", "--weights",
               tmp_path / "clf.pt", "--num-classes", 4, "--depth", 3, "--width", 4, "--batch", 2, "--out",
               tmp_path / "chk", "--no-progress", "--no-plots", "--repeats", 2, "--explore", 2,
               "--sections", "determinism,noise,step")
    assert r.exit_code == 0, r.output
    rep = report(tmp_path / "chk")
    assert rep["subject"]["params"] == 4 * 3 * 9  # the last conv of DnCNN(3, 4): 4 -> 3 channels, 3 x 3
    assert rep["step"]["parameters"]["plain"]["configured"]["mu"] == 5e-3
    assert rep["step"]["model outputs"]["plain"]["configured"]["mu"] == 5e-3  # zo-ds steps on the denoised image
    assert len(rep["step"]["parameters"]["plain"]["coords"]) == 4  # the CPU-sized default
    est = {e["estimator"]: e["queries"] for e in rep["estimators"]}
    assert est["sparse_cge"] == 4 * 3 * 9 + 1 and est["oracle_rge"] == 193
