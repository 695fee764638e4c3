"""Forward parallelization over torch.distributed (gloo, 2 local processes): serial equality, faults, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bbzo.parallel.launch import launcher_command

ROOT = Path(__file__).resolve().parents[3]
EX = ROOT / "examples" / "custom_simulator"
ORACLE = Path(__file__).resolve().parent / "faulty_heater.py"
BBZO = [sys.executable, "-m", "bbzo.cli.main"]


def bbzo_train(out, *extra, env=None, steps=6):
    args = [*BBZO, "train", "--config", EX / "run.yaml", "--oracle", f"{ORACLE}:simulate", "--steps", steps,
            "--checkpoint-every", 1, "--schedule", "constant", "--out", out, "--no-progress", *extra]
    e = {**os.environ, **(env or {})}
    for key in ("BBZO_TEST_FAULT", "BBZO_TEST_FRAGILE"):
        if not env or key not in env:
            e.pop(key, None)
    return subprocess.run([str(a) for a in args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=240)


def weights(out):
    return torch.load(Path(out) / "model.pt", weights_only=True)


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_launcher_command_is_torchrun_without_a_shell():
    cmd = launcher_command(3, ["train", "--steps", "2"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--nproc-per-node=3" in cmd
    assert cmd[-3:] == ["train", "--steps", "2"]


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    out = tmp_path_factory.mktemp("serial") / "run"
    r = bbzo_train(out, steps=8)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_two_workers_train_exactly_like_one_and_resume_with_another_count(serial, tmp_path):
    out = tmp_path / "w2"
    r = bbzo_train(out, "--workers", 2, steps=4)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("validation loss") == 1  # rank 0 reports, once
    first = json.loads((out / "train.json").read_text())
    assert first["workers"] == 2 and first["queries"] == 4 * 83 and first["oracle_rows"] == 4 * 83 * 32
    r = bbzo_train(out, "--resume", "--workers", 1, steps=8)  # a 2-worker checkpoint continued by 1 process
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same(weights(out), weights(serial))
    res, ref = json.loads((out / "results.json").read_text()), json.loads((serial / "results.json").read_text())
    assert res["queries_used"] == ref["queries_used"] == 8 * 83 and res["oracle_rows"] == ref["oracle_rows"]
    assert res["val_loss_final"] == ref["val_loss_final"]


@pytest.mark.parametrize("batch", [8, 24])
def test_two_workers_equal_serial_bitwise_at_batch_sizes_where_chunking_matters(tmp_path, batch):
    """Ranks evaluate whole batched calls of the serial run (bbzo.parallel.deal): equal to the bit, at any batch, with
    the serial run on the ranks' one thread."""
    outs = {}
    for w in (1, 2):
        outs[w] = tmp_path / f"b{batch}w{w}"
        r = bbzo_train(outs[w], "--batch", batch, "--workers", w, env={"OMP_NUM_THREADS": "1"}, steps=6)
        assert r.returncode == 0, r.stderr[-3000:]
    assert_same(weights(outs[1]), weights(outs[2]))


def test_ranks_that_disagree_stop_before_the_first_step(tmp_path):
    """Two torchrun nodes started with different settings: every rank stops with one line naming the rank and key."""
    out, port = tmp_path / "disagree", _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("BBZO_TEST_FAULT", "BBZO_TEST_FRAGILE")}
    env["OMP_NUM_THREADS"] = "1"
    nodes = []
    for rank, seed in ((0, 0), (1, 1)):
        args = ["train", "--config", EX / "run.yaml", "--oracle", f"{ORACLE}:simulate", "--steps", 4, "--seed", seed,
                "--out", tmp_path / f"n{rank}", "--no-progress"]
        nodes.append(subprocess.Popen([str(a) for a in [sys.executable, "-m", "torch.distributed.run", "--nnodes", 2,
                                                         "--nproc-per-node", 1, "--rdzv-backend", "c10d",
                                                         "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "dis",
                                                         "-m", "bbzo.cli.main", *args]],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    logs = [p.communicate(timeout=240) for p in nodes]
    assert all(p.returncode != 0 for p in nodes)
    text = "".join(o + e for o, e in logs)
    assert "does not agree with rank 0 on settings" in text, text[-3000:]
    assert not (tmp_path / "n0" / "checkpoint.pt").exists() and not (tmp_path / "n1" / "checkpoint.pt").exists()
    assert out.exists() is False


def test_oracle_cge_splits_its_output_probes_over_the_workers_exactly(tmp_path):
    """The chain rule is sharded like every estimator: each rank evaluates part of the output probes (the heater's
    2 outputs: 3 queries per step), the ledger counts every row once, and the result is the serial one."""
    runs = {}
    for w in (1, 2):
        out = tmp_path / f"ocge{w}"
        r = bbzo_train(out, "--estimator", "oracle_cge", "--workers", w, steps=5)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[w] = out
    a, b = (json.loads((runs[w] / "train.json").read_text()) for w in (1, 2))
    assert b["workers"] == 2 and a["queries"] == b["queries"] == 5 * 3 and a["oracle_rows"] == b["oracle_rows"] == 5 * 3 * 32
    assert_same(weights(runs[1]), weights(runs[2]))


def test_skipped_samples_are_the_same_on_every_rank(tmp_path):
    """Rows the black box cannot answer, resolved after the gather: the same samples are dropped on every rank."""
    runs = {}
    for w in (1, 2):
        out = tmp_path / f"skip{w}"
        r = bbzo_train(out, "--on-oracle-error", "skip", "--workers", w, env={"BBZO_TEST_FRAGILE": "0.405"}, steps=4)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[w] = out
    a, b = (json.loads((runs[w] / "results.json").read_text()) for w in (1, 2))
    assert a["failed_rows"] == b["failed_rows"] > 0 and a["dropped_samples"] == b["dropped_samples"] > 0
    assert_same(weights(runs[1]), weights(runs[2]))


def test_a_failing_worker_stops_every_rank_with_its_error_and_resume_continues(serial, tmp_path):
    out = tmp_path / "fail"
    r = bbzo_train(out, "--workers", 2, env={"BBZO_TEST_FAULT": "1:5:raise"}, steps=8)
    assert r.returncode != 0
    err = r.stdout + r.stderr
    assert "rank 1 of 2, step" in err and "blew a fuse" in err, err[-3000:]
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    # the last completed step, exactly: every step rank 0 logged (it logs a step once it is applied) and no other
    assert ck["step"] == len((out / "metrics.jsonl").read_text().splitlines()) >= 1
    assert f"holds step {ck['step']}" in err
    r = bbzo_train(out, "--resume", "--workers", 2, steps=8)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same(weights(out), weights(serial))


def test_a_hung_worker_is_named_within_the_timeout(tmp_path):
    out = tmp_path / "hang"
    r = bbzo_train(out, "--workers", 2, "--worker-timeout", 3, env={"BBZO_TEST_FAULT": "1:5:hang"}, steps=8)
    assert r.returncode != 0
    err = r.stdout + r.stderr
    assert "rank 1 did not finish step" in err and "--worker-timeout 3 s" in err, err[-3000:]
    assert (out / "checkpoint.pt").exists()


def test_a_worker_that_dies_is_named_and_nothing_corrupt_is_written(tmp_path):
    out = tmp_path / "die"
    r = bbzo_train(out, "--workers", 2, env={"BBZO_TEST_FAULT": "1:5:die"}, steps=8)  # os._exit on rank 1
    assert r.returncode != 0
    err = r.stdout + r.stderr
    assert "rank 1 did not finish step" in err and "--resume" in err, err[-3000:]
    ck = torch.load(out / "checkpoint.pt", weights_only=False)  # a complete checkpoint, not a torn one
    assert ck["step"] == len((out / "metrics.jsonl").read_text().splitlines()) >= 1  # the last completed step
    assert json.loads((out / "results.json").read_text())["status"] == "failed"  # (resume: the test above)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_with_a_c10d_rendezvous_train_exactly_like_serial(serial, tmp_path):
    """Two ``torchrun --nnodes 2 --node-rank {0,1}`` invocations on this machine, one process each."""
    out, port = tmp_path / "nodes", _free_port()
    args = ["train", "--config", EX / "run.yaml", "--oracle", f"{ORACLE}:simulate", "--steps", 8,
            "--checkpoint-every", 1, "--schedule", "constant", "--out", out, "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "BBZO_TEST_FAULT"}
    env["OMP_NUM_THREADS"] = "1"
    nodes = [subprocess.Popen([str(a) for a in [sys.executable, "-m", "torch.distributed.run", "--nnodes", 2,
                                                 "--node-rank", rank, "--nproc-per-node", 1, "--rdzv-backend", "c10d",
                                                 "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "bbzo-test",
                                                 "-m", "bbzo.cli.main", *args]],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    logs = [p.communicate(timeout=240) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), [e[-2000:] for _, e in logs]
    assert json.loads((out / "train.json").read_text())["workers"] == 2
    assert_same(weights(out), weights(serial))


def test_ranks_share_a_gpu_through_gloo_and_get_their_own_through_nccl():
    from bbzo.errors import ConfigError
    from bbzo.parallel import plan_devices

    assert plan_devices("cpu", 1, 2, 0, True) == ("gloo", None)
    # one GPU per rank: NCCL, rank r on GPU r
    assert [plan_devices("cuda", r, 4, 4, True) for r in range(4)] == [("nccl", r) for r in range(4)]
    # 4 ranks on 2 GPUs (or on one): round robin, collectives through gloo (NCCL refuses two ranks on a GPU)
    assert [plan_devices("cuda", r, 4, 2, True) for r in range(4)] == [("gloo", g) for g in (0, 1, 0, 1)]
    assert plan_devices("cuda", 1, 2, 1, True) == ("gloo", 0)
    assert plan_devices("cuda", 0, 1, 1, False) == ("gloo", 0)  # a torch without NCCL
    assert plan_devices("cuda:1", 0, 1, 2, True) == ("nccl", 1) and plan_devices("cuda:1", 1, 2, 2, True) == ("gloo", 1)
    with pytest.raises(ConfigError, match="no GPU"):
        plan_devices("cuda", 0, 1, 0, True)
    with pytest.raises(ConfigError, match="cuda:0 .. cuda:1"):
        plan_devices("cuda:2", 0, 1, 2, True)
