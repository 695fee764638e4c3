import json

import numpy as np
from click.testing import CliRunner

from bbzo.cli.main import main

HEATER = "examples/custom_simulator/heater.py"


def test_prune_writes_a_readable_lpr_and_train_uses_it(tmp_path):
    lpr = tmp_path / "lpr.json"
    r = CliRunner().invoke(main, ["prune", "--model", "simple_cnn", "--score", "layer_noise", "--sparsity", "0.75",
                                  "--out", str(lpr)])
    assert r.exit_code == 0, r.output
    d = json.loads(lpr.read_text())
    assert d["model"] == "simple_cnn" and d["score"] == "layer_noise" and d["sparsity"] == 0.75
    assert d["total_kept"] == round(0.25 * d["total_size"]) and "| layer |" in r.output
    # a data-dependent score on a user's .npz, and a clear error without data
    rng = np.random.default_rng(0)
    data = tmp_path / "imgs.npz"
    np.savez(data, train_x=rng.integers(0, 255, (40, 32, 32, 3), dtype=np.uint8), train_y=np.arange(40) % 10)
    r = CliRunner().invoke(main, ["prune", "--model", "simple_cnn", "--score", "zo_grasp_oracle", "--data", str(data),
                                  "--per-class", "2", "--out", str(tmp_path / "o.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o.json").read_text())["queries"] == 60
    r = CliRunner().invoke(main, ["prune", "--model", "simple_cnn", "--score", "zo_grasp", "--out", str(lpr)])
    assert r.exit_code != 0 and "--data" in r.output
    r = CliRunner().invoke(main, ["prune", "--score", "fo_grasp", "--data", str(tmp_path / "nope"), "--out", str(lpr)])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_train_with_lpr_and_resampling(tmp_path):
    lpr = tmp_path / "lpr.json"
    r = CliRunner().invoke(main, ["prune", "--model", f"{HEATER}:build", "--score", "magnitude", "--sparsity", "0.5",
                                  "--out", str(lpr)])
    assert r.exit_code == 0, r.output
    kept = json.loads(lpr.read_text())["total_kept"]
    out = tmp_path / "run"
    args = ["train", "--config", "examples/custom_simulator/run.yaml", "--oracle", f"{HEATER}:simulate",
            "--estimator", "sparse_cge", "--lpr", str(lpr), "--resample-every", "4", "--steps", "12",
            "--out", str(out), "--no-progress"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["sparsity_draw"] for row in rows] == [0] * 4 + [1] * 4 + [2] * 4
    n_bias = rows[0]["coords"] - kept  # biases are dense by default
    assert n_bias > 0 and all(row["queries"] == kept + n_bias + 1 for row in rows)
    res = json.loads((out / "results.json").read_text())
    assert res["val_loss_final"] < res["val_loss_initial"]
    r = CliRunner().invoke(main, args[:-1] + ["--estimator", "cge", "--out", str(tmp_path / "x"), "--no-progress"])
    assert r.exit_code == 2 and "sparse_cge" in r.output
