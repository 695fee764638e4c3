"""Runs that never report success when they are wrong (issue 30): one run per folder, signals that save, resume
rules that change nothing when they refuse, bad input named at load time. Each test is one row of docs/faults.md."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bbzo.errors import ConfigError
from bbzo.runlock import RunLock

ROOT = Path(__file__).resolve().parents[2]
EX = ROOT / "examples" / "custom_simulator"
BBZO = [sys.executable, "-m", "bbzo.cli.main"]
SIM = f"{EX / 'heater.py'}:simulate"


def train_cmd(out, *extra, steps=6):
    return [*BBZO, "train", "--config", str(EX / "run.yaml"), "--oracle", SIM, "--steps", str(steps),
            "--checkpoint-every", "100", "--schedule", "constant", "--out", str(out), "--no-progress",
            *map(str, extra)]


def run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kw)


def wait_for_rows(path, n, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended early: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    pytest.fail("the run did not log its steps in time")


def weights(out):
    return torch.load(Path(out) / "model.pt", weights_only=True)


# ---------------------------------------------------------------------------- one run per folder
def test_a_folder_is_held_by_one_run_and_the_holder_is_named(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from bbzo.runlock import RunLock; RunLock(sys.argv[1], 'bbzo train --out x').acquire(); "
        "print('held', flush=True); time.sleep(60)"), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"in use by another bbzo run \(PID {holder.pid} on .*bbzo train --out x"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(tmp_path, "next").acquire()  # the OS released the dead holder's lock; the file names it
    assert lock.stale is not None and lock.stale["pid"] == holder.pid
    lock.release()
    assert not (tmp_path / "run.lock").exists()


def test_two_trainings_into_one_folder_at_once_the_second_is_refused(tmp_path):
    out = tmp_path / "r"
    first = subprocess.Popen(train_cmd(out, steps=10**6), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for_rows(out / "metrics.jsonl", 1, first)
        second = run(train_cmd(out, "--overwrite", steps=10**6))  # the first cannot finish meanwhile
        assert second.returncode == 2 and "is in use by another bbzo run" in second.stderr
        assert f"PID {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)


# ---------------------------------------------------------------------------- signals
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_last_completed_step_and_the_resume_command_continues_exactly(tmp_path, sig):
    full = tmp_path / "full"
    assert run(train_cmd(full, steps=40)).returncode == 0
    out = tmp_path / "cut"
    proc = subprocess.Popen(train_cmd(out, steps=40), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_rows(out / "metrics.jsonl", 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + int(sig), err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1, err[-2000:]
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    logged = len((out / "metrics.jsonl").read_text().splitlines())
    assert saved == logged and 3 <= saved < 40  # the last completed step: what the log shows, nothing more
    assert f"holds step {saved}" in err and "--resume" in err
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "interrupted" and res["trainings"]["train"]["steps"] == saved
    assert not (out / "run.lock").exists()
    command = err[err.index("continue with: ") + len("continue with: "):].split()
    assert command[0] == "bbzo" and "--resume" in command
    again = run([*BBZO, *command[1:]])
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = weights(full), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killing_the_parent_of_a_two_worker_run_stops_every_rank(tmp_path):
    out = tmp_path / "w2"
    proc = subprocess.Popen(train_cmd(out, "--workers", 2, steps=400), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_rows(out / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    time.sleep(1.0)
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert left == [], f"orphaned ranks: {left}"
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert f"holds step {saved}" in err and json.loads((out / "results.json").read_text())["status"] == "interrupted"
    assert "every one of the 2 workers has stopped" in err  # the parent waited for its ranks


# ---------------------------------------------------------------------------- resume rules
def test_a_refused_resume_changes_nothing_on_disk(tmp_path):
    out = tmp_path / "done"
    assert run(train_cmd(out, steps=3)).returncode == 0
    before = {f: (out / f).read_bytes() for f in ("results.json", "run.json", "config.resolved.yaml")}
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        if (out / name).exists():
            (out / name).write_bytes(b"damaged")
    r = run(train_cmd(out, "--resume", steps=6))
    assert r.returncode == 2 and "checkpoint.pt" in r.stderr and "weights_only=False" not in r.stderr
    assert {f: (out / f).read_bytes() for f in before} == before


def test_a_failed_setup_leaves_no_claim_and_the_corrected_command_runs(tmp_path):
    out = tmp_path / "typo"
    r = run(train_cmd(out, "--data-kwargs", "{m: 64}", steps=2))  # make_data takes n, not m
    assert r.returncode == 2 and not (out / "run.json").exists() and not (out / "run.lock").exists()
    assert run(train_cmd(out, "--data-kwargs", "{n: 64}", steps=2)).returncode == 0


def test_every_command_refuses_a_folder_holding_a_run_without_resume_or_overwrite(tmp_path):
    fit = ROOT / "examples" / "new_task" / "fit_task.py"
    cmd = [*BBZO, "run", "--import", str(fit), "fit-line", "--steps", "3", "--out", str(tmp_path / "f"), "--no-progress"]
    assert run(cmd).returncode == 0
    again = run(cmd)
    assert again.returncode == 2 and "--resume" in again.stderr and "--overwrite" in again.stderr
    assert run([*cmd, "--overwrite"]).returncode == 0


def test_the_black_box_and_its_failure_policy_may_change_on_resume(tmp_path):
    """'Fix the cause and rerun with --resume' must be possible when the fix is the program or the policy."""
    out = tmp_path / "switch"
    base = [a for a in train_cmd(out, steps=3) if a not in ("--oracle", SIM)]  # the config's program: heater.sh
    assert run(base).returncode == 0
    r = run([*base, "--resume", "--steps", "5", "--oracle-cmd", f"bash {EX / 'heater.sh'}", "--on-oracle-error",
             "skip", "--oracle-restarts", "2"])
    assert r.returncode == 0, r.stderr[-2000:]
    hist = json.loads((out / "run.json").read_text())["history"][-1]
    assert {"oracle_cmd", "on_oracle_error", "oracle_restarts"} <= set(hist["changed"])


# ---------------------------------------------------------------------------- bad input
def test_bad_input_is_one_line_that_names_it(tmp_path):
    x = np.random.default_rng(0).uniform(0, 1, (64, 2))
    x[17, 1] = np.nan
    np.savez(tmp_path / "nan.npz", inputs=x, targets=np.ones((64, 2)))
    cases = [
        (["--data", tmp_path / "nan.npz"], "inputs hold NaN/inf in 1 rows (first: row 17)"),
        (["--lr", -1], "--lr must be > 0"),
        (["--seed", -1], "--seed must be >= 0"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "no CUDA device is visible"))
    (tmp_path / "text.npz").write_text("inputs,targets\n1,2\n")
    cases.append((["--data", tmp_path / "text.npz"], "is not an .npz archive"))
    for extra, message in cases:
        r = run(train_cmd(tmp_path / "bad", *extra, steps=2))
        assert r.returncode == 2 and message in r.stderr, (extra, r.stderr[-1500:])
        assert "Traceback" not in r.stderr and "allow_pickle" not in r.stderr
        assert len([line for line in r.stderr.splitlines() if line.startswith("error:")]) == 1


def test_a_run_folder_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    r = run(train_cmd(tmp_path / "a-file" / "run", steps=2))  # the OS refuses: NotADirectoryError, an OSError
    assert r.returncode == 2 and "Traceback" not in r.stderr and "could not read or write" in r.stderr
    assert "intact" in r.stderr
