"""``bbzo train`` end to end: Python oracles by reference, the shipped awk simulator, configs, faults, resume."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from bbzo.checkpoint import load_checkpoint
from bbzo.cli.main import main
from bbzo.cli.train import train
from bbzo.listeners import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
EX = ROOT / "examples" / "custom_simulator"
FAKE = ROOT / "tests" / "oracles" / "fake_program.py"
HEATER_STEPS = 15


def invoke(*args):
    return CliRunner().invoke(main, ["train", *map(str, args)])


def heater_args(out, *extra):
    return ["--config", EX / "run.yaml", "--steps", HEATER_STEPS, "--out", out, "--no-progress", *extra]


def results(out):
    return json.loads((Path(out) / "results.json").read_text())


@pytest.fixture
def fake_data(tmp_path):
    """An .npz task for the fake program (oracle row = 2 model outputs, answer = their sum)."""
    g = np.random.default_rng(0)
    x = g.uniform(-1, 1, (160, 3))
    np.savez(tmp_path / "d.npz", inputs=x, targets=x[:, :1] - 0.5 * x[:, 1:2] + 0.3 * x[:, 2:3] ** 2)
    return tmp_path / "d.npz"


def fake_args(data, out, *program_args, extra=()):
    cmd = " ".join([sys.executable, str(FAKE), *program_args])
    return ["--oracle-cmd", cmd, "--model", "mlp", "--model-kwargs", "{in_features: 3, out_features: 2, hidden: [4]}",
            "--data", data, "--batch", 8, "--steps", 8, "--lr", 0.05, "--out", out, "--no-progress", *extra]


@pytest.mark.parametrize("ref", ["heater.py:simulate", "heater.py:HeaterOracle"])
def test_python_oracle_by_reference_trains_end_to_end(tmp_path, ref):
    out = tmp_path / "run"
    r = invoke(*heater_args(out, "--oracle", f"{EX / ref}"))
    assert r.exit_code == 0, r.output
    res = results(out)
    assert res["steps"] == HEATER_STEPS and res["params"] == 82 and res["queries_per_step"] == 83
    assert res["queries_used"] == 83 * HEATER_STEPS and res["oracle_rows"] == 83 * HEATER_STEPS * 32
    assert res["val_loss_final"] < 0.2 * res["val_loss_initial"]  # 17.2 -> ~1 deg C^2 in 15 steps
    rows = read_jsonl(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, HEATER_STEPS + 1))
    assert all(row["queries"] == 83 and row["queries_per_s"] > 0 for row in rows)
    assert rows[-1]["queries_used"] == res["queries_used"]
    saved = yaml.safe_load((out / "config.resolved.yaml").read_text())
    assert saved["oracle"] == str(EX / ref) and saved["oracle_cmd"] is None  # the flag replaced the file's program
    assert (out / "model.pt").exists() and load_checkpoint(out)["step"] == HEATER_STEPS


@pytest.mark.skipif(shutil.which("awk") is None, reason="needs awk")
def test_the_shipped_awk_simulator_trains_like_its_python_twin(tmp_path):
    r = invoke(*heater_args(tmp_path / "awk"))
    assert r.exit_code == 0, r.output
    r = invoke(*heater_args(tmp_path / "py", "--oracle", f"{EX / 'heater.py:simulate'}"))
    assert r.exit_code == 0, r.output
    a, p = results(tmp_path / "awk"), results(tmp_path / "py")
    assert a["val_loss_final"] < 0.2 * a["val_loss_initial"]
    # the awk program prints 17 significant digits: the same numbers, hence the same training run
    assert a["val_loss_final"] == pytest.approx(p["val_loss_final"], rel=1e-6)
    assert a["oracle_rows"] == p["oracle_rows"] and "validation loss" in r.output


def test_config_file_overridden_by_a_flag(tmp_path, fake_data):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "oracle_cmd": [sys.executable, str(FAKE)], "model": "mlp",
        "model_kwargs": {"in_features": 3, "out_features": 2, "hidden": [4]}, "data": str(fake_data),
        "batch": 8, "steps": 6, "lr": 0.05, "estimator": "rge", "q": 4, "out": str(tmp_path / "from_file"),
        "no_progress": True}))
    out = tmp_path / "from_flag"
    r = invoke("--config", cfg, "--steps", 3, "--out", out)
    assert r.exit_code == 0, r.output
    res = results(out)
    assert res["steps"] == 3 and res["queries_per_step"] == 5  # rge q=4 from the file: q + 1
    assert not (tmp_path / "from_file").exists()
    text = (out / "config.resolved.yaml").read_text()
    assert "steps: 3  # from command line" in text and "q: 4  # from config" in text
    assert "lr: 0.05  # from config" in text and "mu: 0.005\n" in text  # a default: no comment
    # the resolved config re-runs the same thing
    r = invoke("--config", out / "config.resolved.yaml", "--out", tmp_path / "again")
    assert r.exit_code == 0, r.output
    assert results(tmp_path / "again")["val_loss_final"] == res["val_loss_final"]


def test_max_queries_stops_cleanly_with_a_checkpoint(tmp_path, fake_data):
    out = tmp_path / "run"
    r = invoke(*fake_args(fake_data, out, extra=["--max-queries", 100]))  # 27 queries per step -> 3 steps
    assert r.exit_code == 0, r.output
    res = results(out)
    assert res["stopped_by"] == "max_queries" and res["steps"] == 3 and res["queries_used"] == 81
    assert "stopped by --max-queries" in r.output and load_checkpoint(out)["step"] == 3
    r = invoke(*fake_args(fake_data, tmp_path / "tiny", extra=["--max-queries", 10]))
    assert r.exit_code == 2 and "less than one step (27 queries" in r.output


def test_a_crash_mid_run_leaves_a_checkpoint_and_resume_completes_the_same_run(tmp_path, fake_data):
    ref = tmp_path / "uninterrupted"
    assert invoke(*fake_args(fake_data, ref)).exit_code == 0
    out, marker = tmp_path / "crashed", tmp_path / "crashed-once"
    # requests: 1 = the initial evaluation, then 3 per step (base, 2 chunks of probes): 9 is in step 3
    args = fake_args(fake_data, out, "--mode", "crash", "--at", "9", "--marker", str(marker),
                     extra=["--checkpoint-every", 0])
    r = invoke(*args)
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit)
    first, line = r.output.splitlines()[0], " ".join(r.output.split())
    assert len(first) <= 300 and first.startswith("error: oracle program")  # what happened first, details after
    assert "exited with code 3" in first and "call #" in first and "(step 3, " in first and "fake_program.py" in first
    assert f"The checkpoint {out / 'checkpoint.pt'} holds step 2; continue with:" in line and "--resume" in line
    assert "Segmentation fault (pretend)" in line
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == 2 and ckpt["queries_used"] == 54 and not list(out.glob(".checkpoint.pt.*"))
    assert len(read_jsonl(out / "metrics.jsonl")) == 2
    r = invoke(*args, "--resume")
    assert r.exit_code == 0, r.output
    res = results(out)
    assert res["steps"] == 8 and res["resumed_from_step"] == 2 and res["queries_used"] == 8 * 27
    assert [row["step"] for row in read_jsonl(out / "metrics.jsonl")] == list(range(1, 9))
    a = torch.load(ref / "model.pt", weights_only=True)
    b = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise the run that never crashed


def test_restarts_let_a_run_survive_a_transient_crash(tmp_path, fake_data):
    out = tmp_path / "run"
    r = invoke(*fake_args(fake_data, out, "--mode", "crash", "--at", "5", "--marker", str(tmp_path / "m"),
                          extra=["--oracle-restarts", 1]))
    assert r.exit_code == 0, r.output
    res = results(out)
    assert res["oracle_restarts"] == 1 and res["steps"] == 8


@pytest.mark.parametrize("mode, message", [("hang", "no complete answer within the timeout of 0.5 s (--oracle-timeout"),
                                           ("nan", "returned NaN/inf"),
                                           ("wrong_rows", "wrong number of rows")])
def test_oracle_faults_are_clear_errors(tmp_path, fake_data, mode, message):
    timeout = 0.5 if mode == "hang" else 60
    r = invoke(*fake_args(fake_data, tmp_path / "run", "--mode", mode, "--at", "3", extra=["--oracle-timeout", timeout]))
    assert r.exit_code == 2, r.output
    first = r.output.splitlines()[0]
    assert len(first) <= 300 and message in " ".join(r.output.split()) and "fake_program.py" in first


def test_python_oracle_exceptions_and_bad_options_are_one_line_errors(tmp_path, fake_data):
    sim = tmp_path / "sim.py"
    sim.write_text("def simulate(x):\n    raise ValueError('mesh too coarse')\n")
    r = invoke("--oracle", f"{sim}:simulate", "--model", "mlp", "--data", fake_data, "--out", tmp_path / "a",
               "--no-progress", "--loss", "oracle", "--model-kwargs", "{in_features: 3, out_features: 2}")
    assert r.exit_code == 2 and "raised ValueError at sim.py:2: mesh too coarse" in r.output
    base = ["--model", "mlp", "--data", fake_data, "--no-progress"]
    for args, message in [
        (["--oracle", f"{sim}:simulate", "--oracle-cmd", "x", *base], "name the black box once"),
        (["--model", "mlp", "--data", fake_data], "no black box given"),
        (["--oracle", f"{sim}:simulate", "--model", "mlp", "--data", tmp_path / "none.npz"], "data file"),
        (["--oracle", f"{sim}:nope", *base], "has no attribute 'nope'"),
        (["--oracle", f"{sim}:simulate", *base, "--model", "nonet"], "neither a registered model"),
        (["--oracle", f"{sim}:simulate", *base, "--oracle-input", "inputs"], "include outputs"),
        (["--oracle-cmd", f"{sys.executable} {FAKE} --d-in 3", *base, "--model-kwargs", "{in_features: 3}"],
         "takes rows of (3,) values, but --oracle-input outputs gives 2 per row"),
    ]:
        r = invoke(*args, "--out", tmp_path / "b", "--overwrite")
        first = r.output.splitlines()[0]
        assert r.exit_code == 2 and message in " ".join(r.output.split()) and len(first) <= 300, (args, r.output)
        assert "Traceback" not in r.output


def test_an_existing_run_needs_resume_or_overwrite(tmp_path, fake_data):
    out = tmp_path / "run"
    args = fake_args(fake_data, out, extra=["--steps", 2])
    assert invoke(*args).exit_code == 0
    r = invoke(*args)
    assert r.exit_code == 2 and "already holds a run" in r.output
    assert invoke(*args, "--overwrite").exit_code == 0 and results(out)["resumed_from_step"] == 0


def test_help_documents_every_option_and_demo_takes_a_config(tmp_path):
    r = CliRunner().invoke(main, ["train", "--help"])
    assert r.exit_code == 0
    for p in train.params:
        assert p.help and p.opts[0] in r.output, p.name
    cfg = tmp_path / "demo.yaml"
    cfg.write_text("estimators: cge\nsteps: 2\nno_plots: true\nno_progress: true\n")
    r = CliRunner().invoke(main, ["demo", "--config", str(cfg), "--out", str(tmp_path / "demo"), "--batch", "8"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "demo" / "results.json").read_text())["results"][0]["steps"] == 2
    text = (tmp_path / "demo" / "config.resolved.yaml").read_text()
    assert "steps: 2  # from config" in text and "batch: 8  # from command line" in text


def test_a_changed_setting_on_resume_is_refused_by_name_and_steps_extend_the_run(tmp_path, fake_data):
    out = tmp_path / "run"
    args = fake_args(fake_data, out, extra=["--steps", 2])
    assert invoke(*args).exit_code == 0
    r = invoke(*args, "--resume", "--lr", 0.5)  # never recorded-but-ignored
    assert r.exit_code == 2 and "differs in: lr (0.05 -> 0.5))." in r.output and "lr: lr" not in r.output
    r = invoke(*args, "--resume", "--steps", 4)
    assert r.exit_code == 0, r.output
    res = results(out)
    assert res["steps"] == 4 and res["resumed_from_step"] == 2
    assert "steps: 4  # from command line" in (out / "config.resolved.yaml").read_text()
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows[2]["lr"] > 0.01  # the cosine continues over 4 steps, not at the old schedule's lr 0
    r = invoke(*fake_args(fake_data, tmp_path / "fresh", extra=["--resume"]))
    assert r.exit_code == 2 and "holds no checkpoint" in r.output


def test_train_eval_scores_a_trained_run_on_another_data_file(tmp_path, fake_data):
    out = tmp_path / "run"
    assert invoke(*fake_args(fake_data, out)).exit_code == 0
    g = np.random.default_rng(1)
    x = g.uniform(-1, 1, (40, 3))
    np.savez(tmp_path / "other.npz", inputs=x, targets=x[:, :1] - 0.5 * x[:, 1:2] + 0.3 * x[:, 2:3] ** 2)
    r = invoke("eval", "--out", out, "--data", tmp_path / "other.npz")
    assert r.exit_code == 0, r.output
    other, = out.glob("eval-other-*.json")  # one file per data source
    ev = json.loads(other.read_text())
    assert ev["rows"] == 40 and ev["oracle_rows"] == 40 and 0 < ev["loss"] < results(out)["val_loss_initial"]
    assert ev["data_kwargs"] == {} and str(other) in r.output
    # another source gets its own file; the first one is not overwritten
    x2 = x[:20]
    np.savez(tmp_path / "third.npz", inputs=x2, targets=x2[:, :1] - 0.5 * x2[:, 1:2] + 0.3 * x2[:, 2:3] ** 2)
    assert invoke("eval", "--out", out, "--data", tmp_path / "third.npz").exit_code == 0
    third, = out.glob("eval-third-*.json")
    assert json.loads(other.read_text())["rows"] == 40 and json.loads(third.read_text())["rows"] == 20


def test_eval_file_names_differ_by_source_and_keyword_arguments(tmp_path):
    from bbzo.cli.train import eval_file_name

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    names = {eval_file_name(str(tmp_path / "a" / "d.npz"), None), eval_file_name(str(tmp_path / "b" / "d.npz"), None),
             eval_file_name("net.py:make_data", None), eval_file_name("net.py:make_data", {"n": 96}),
             eval_file_name("net.py:make_data", {"n": 97})}
    assert len(names) == 5 and all(n.startswith("eval-") and n.endswith(".json") and "/" not in n for n in names)
    assert eval_file_name("net.py:make_data", {"n": 96}).startswith("eval-net-make_data-")
    assert eval_file_name(str(tmp_path / "a" / "d.npz"), None) == eval_file_name(str(tmp_path / "a" / "d.npz"), {})


def test_a_command_line_data_file_replaces_the_config_files_data_source(tmp_path):
    sys.path.insert(0, str(EX))
    try:
        import heater
    finally:
        sys.path.remove(str(EX))
    x, y = heater.make_data(n=96)
    np.savez(tmp_path / "mine.npz", inputs=x, targets=y)
    out = tmp_path / "run"
    r = invoke(*heater_args(out, "--oracle", f"{EX / 'heater.py:simulate'}", "--data", tmp_path / "mine.npz",
                            "--steps", 2))
    assert r.exit_code == 0, r.output  # the file's data_kwargs {n: 2048} belonged to its data function
    saved = yaml.safe_load((out / "config.resolved.yaml").read_text())
    assert saved["data"] == str(tmp_path / "mine.npz") and saved["data_kwargs"] == {}


def strict_json(path):
    """The file parsed by a strict JSON parser (a bare NaN/Infinity is an error, as in JavaScript's JSON.parse)."""
    def refuse(name):
        raise ValueError(f"{path} holds a bare {name}")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


@pytest.mark.parametrize("estimator", ["cge", "oracle_cge"])
@pytest.mark.parametrize("policy", ["stop", "penalize", "skip"])
def test_rows_the_program_cannot_answer_follow_the_failure_policy(tmp_path, fake_data, policy, estimator):
    """A SPICE-like program that reports some rows as failed: every estimator honours --on-oracle-error; penalize
    keeps the gradient in the range of a run without failures; the results are strict JSON."""
    out = tmp_path / policy
    extra = ["--on-oracle-error", policy, "--estimator", estimator, "--mu", 1e-3, "--val-fraction", 0.25]
    r = invoke(*fake_args(fake_data, out, "--mode", "fail_rows", "--threshold", "0.6", extra=extra))
    if policy == "stop":
        assert r.exit_code == 2 and "NaN/inf" in r.output and "--on-oracle-error penalize|skip" in r.output
        return
    assert r.exit_code == 0, r.output
    res = strict_json(out / "results.json")
    assert res["failed_rows"] > 0 and res["on_oracle_error"] == policy and "could not answer" in r.output
    rows = read_jsonl(out / "metrics.jsonl")
    for key in ("failed_rows", "dropped_samples", "penalized_rows"):
        assert sum(row[key] for row in rows) == res[key]
    # validation: the loss over the rows the program answered, and how many it did not
    assert res["val_loss_final"] is not None and res["val_failed_rows"] > 0 and "left out" in r.output
    assert res["val_rows"] + res["val_failed_rows"] == 40
    # the queries actually spent are the declared ones: nothing is evaluated twice
    assert res["queries_used"] == res["queries_per_step"] * res["steps"]
    if policy == "skip":
        assert res["dropped_samples"] > 0 and res["penalized_rows"] == 0
    else:  # samples deep in the failing region fail in every probe too: nothing to penalize, they are dropped
        assert res["penalized_rows"] + res["dropped_samples"] > 0
    clean = tmp_path / "clean"
    assert invoke(*fake_args(fake_data, clean, extra=extra[2:])).exit_code == 0
    norm = lambda p: sorted(row["grad_norm"] for row in read_jsonl(p / "metrics.jsonl"))[4]  # noqa: E731  (median)
    assert norm(out) < 5 * norm(clean), (norm(out), norm(clean))
