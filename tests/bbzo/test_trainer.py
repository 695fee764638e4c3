"""Trainer: hooks and status, bitwise resume, atomic and corrupt checkpoints, failure handling."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bbzo
from bbzo.checkpoint import load_checkpoint, save_checkpoint
from bbzo.data import TensorBatches
from bbzo.errors import CheckpointError, OracleError
from bbzo.listeners import JSONLLogger, read_jsonl
from bbzo.optim import cosine_with_warmup, make_optimizer
from bbzo.trainer import Trainer
from tests.helpers import SpyOracle


class Evil:
    """Any non-tensor object: weights_only loading must refuse to build it."""


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3))


def build(run_dir, estimator="rge", fail_at_row=None, **kw):
    model = small_cnn().train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 6, 6, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    oracle = SpyOracle(3, 3)
    if fail_at_row is not None:
        inner = oracle._query

        def flaky(inp):
            if oracle.rows_used >= fail_at_row:
                return inner(inp) * float("nan")
            return inner(inp)
        oracle._query = flaky

    def loss_fn(out, t):
        return F.cross_entropy(oracle.query(out) * 5, t, reduction="none")

    est = bbzo.create_estimator(estimator, q=6, seed=4) if estimator == "rge" else bbzo.create_estimator(estimator)
    opt = make_optimizer(model.parameters(), "sgd", lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = cosine_with_warmup(opt, total_steps=8, warmup_steps=2)
    tr = Trainer(model, loss_fn, est, opt, TensorBatches(x, y, 16, seed=3), max_steps=8, scheduler=sched,
                 oracle=oracle, run_dir=run_dir, **kw)
    return tr, model, oracle


@pytest.mark.parametrize("estimator", ["rge", "cge"])
def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path, estimator):
    full, model_a, oracle_a = build(tmp_path / "a", estimator)
    full.run()
    part, _, _ = build(tmp_path / "b", estimator, checkpoint_every=3)
    JSONLLogger(tmp_path / "b" / "m.jsonl").attach(part)
    part.run(steps=5)  # checkpoint at step 3, then two steps that are "lost" in the crash
    assert part.step_count == 5
    resumed, model_b, oracle_b = build(tmp_path / "b", estimator, checkpoint_every=3)
    log = JSONLLogger(tmp_path / "b" / "m.jsonl").attach(resumed)
    # simulate the crash: the last checkpoint on disk is step 5's final save -> rewind to step 3's
    ck = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert ck["step"] == 5
    part3, _, _ = build(tmp_path / "c", estimator)
    part3.run(steps=3)
    part3.save_checkpoint(tmp_path / "b" / "checkpoint.pt")
    resumed.resume()
    assert resumed.step_count == 3 and [r["step"] for r in read_jsonl(log.path)] == [1, 2, 3]
    resumed.run()
    for (n, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), n
    assert resumed.queries_used == full.queries_used
    assert oracle_b.rows_used == oracle_a.rows_used and resumed.ledger.state_dict() == full.ledger.state_dict()
    assert [r["step"] for r in read_jsonl(log.path)] == list(range(1, 9))


def test_status_hooks_and_query_accounting(tmp_path):
    tr, model, oracle = build(None, "cge")
    x_all, y_all = tr.data.inputs, tr.data.targets

    def full_loss():
        model.eval()
        with torch.no_grad():
            v = float(F.cross_entropy(torch.tanh(model(x_all).double() @ oracle.W) * 5, y_all))
        model.train()
        return v

    start = full_loss()
    seen = {"before": 0, "after": [], "log": []}
    tr.before_step.append(lambda t: seen.__setitem__("before", seen["before"] + 1))
    tr.after_step.append(lambda t, s: seen["after"].append(dict(s)))
    tr.log_every = 4
    tr.on_log.append(lambda t, s: seen["log"].append(s["step"]))
    tr.run()
    d = sum(p.numel() for p in model.parameters())
    assert seen["before"] == 8 and seen["log"] == [4, 8]
    s = seen["after"][-1]
    assert s["queries"] == d + 1 and s["queries_used"] == 8 * (d + 1)
    assert s["oracle_rows"] == oracle.rows_used == 8 * (d + 1) * 16
    # the numbers are the run's: the lr the schedule gave the step, the norm of the estimate in .grad
    lrs = [a["lr"] for a in seen["after"]]
    assert lrs[:2] == [0.005, 0.01] and lrs[-1] < lrs[2] and lrs == sorted(lrs[:2]) + sorted(lrs[2:], reverse=True)
    norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())))
    assert s["grad_norm"] == pytest.approx(norm, rel=1e-12)
    assert s["queries_per_s"] == pytest.approx(s["queries"] / s["step_time"]) and s["elapsed_s"] >= s["step_time"] > 0
    assert 0 < seen["after"][0]["loss"] < 5
    assert full_loss() < start - 0.05  # it learns
    assert model[1].num_batches_tracked.item() == 8  # one stats update per step, none from queries


def test_checkpoint_is_atomic_and_corrupt_files_give_clear_errors(tmp_path):
    p = tmp_path / "ck.pt"
    save_checkpoint(p, {"step": 1, "x": torch.ones(3)})
    assert [f.name for f in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left behind

    class Boom(Exception):
        pass

    def bad_write(f):
        f.write(b"partial")
        raise Boom

    from bbzo.checkpoint import atomic_write_bytes
    with pytest.raises(Boom):
        atomic_write_bytes(p, bad_write)
    assert load_checkpoint(p)["step"] == 1  # old checkpoint intact
    assert [f.name for f in tmp_path.iterdir()] == ["ck.pt"]
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_checkpoint(p)
    assert "weights_only" not in str(e.value)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")
    # a pickle with arbitrary objects is refused by weights_only loading, and torch's advice is not relayed
    torch.save({"format": 1, "obj": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not written by bbzo") as e:
        load_checkpoint(tmp_path / "evil.pt")
    assert "weights_only=False" not in str(e.value)


def test_the_previous_checkpoint_is_a_recovery_copy(tmp_path):
    from bbzo.checkpoint import RecoveredCheckpointWarning

    tr, model, _ = build(tmp_path / "r", "cge", checkpoint_every=2)
    tr.run(steps=4)  # checkpoints at steps 2 and 4: step 2's is the recovery copy
    assert load_checkpoint(tmp_path / "r" / "checkpoint.prev.pt", allow_previous=False)["step"] == 2
    (tmp_path / "r" / "checkpoint.pt").write_bytes(b"damaged")
    again, model2, _ = build(tmp_path / "r", "cge", checkpoint_every=2)
    with pytest.warns(RecoveredCheckpointWarning, match="step 2"):
        again.resume()
    assert again.step_count == 2
    again.run()
    ref, model3, _ = build(tmp_path / "ref", "cge")
    ref.run()
    assert all(torch.equal(a, b) for a, b in zip(model2.state_dict().values(), model3.state_dict().values()))


def test_a_budget_stops_cleanly_before_the_step_that_would_exceed_it(tmp_path):
    from bbzo.ledger import QueryLedger
    from bbzo.listeners import BudgetGuard

    tr, model, oracle = build(tmp_path / "b", "rge", ledger=QueryLedger(max_queries=20))  # 7 queries per step
    BudgetGuard().attach(tr)
    tr.run()
    assert tr.step_count == 2 and tr.stop_reason == "max_queries" and tr.ledger.queries == 14
    assert load_checkpoint(tmp_path / "b")["step"] == 2


def test_extending_a_run_replans_the_cosine_over_the_new_length(tmp_path):
    tr, _, _ = build(tmp_path / "x", "cge")
    tr.run()  # 8 steps: the cosine ends at lr 0
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    longer, _, _ = build(tmp_path / "x", "cge")
    longer.max_steps = 16
    longer.scheduler = cosine_with_warmup(longer.optimizer, total_steps=16, warmup_steps=2)
    longer.resume()  # the checkpoint was written for 8 steps: the schedule is re-planned over 16
    lr = longer.optimizer.param_groups[0]["lr"]
    import math
    assert lr == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 6 / 14)))  # cosine(16) at step 8, no jump to 0
    seen = []
    longer.after_step.append(lambda t, s: seen.append(s["lr"]))
    longer.run()
    assert seen[0] == pytest.approx(lr) and seen == sorted(seen, reverse=True) and longer.elapsed > tr.elapsed


def test_mismatched_checkpoint_is_refused(tmp_path):
    tr, _, _ = build(tmp_path / "r", "cge")
    tr.run(steps=1)
    other, _, _ = build(tmp_path / "r", "rge")
    with pytest.raises(CheckpointError, match="estimator"):
        other.resume()


def test_failure_mid_run_keeps_last_completed_state(tmp_path):
    tr, model, oracle = build(tmp_path / "f", "rge", fail_at_row=7 * 16 * 3)
    with pytest.raises(OracleError, match="NaN/inf"):
        tr.run()
    done = tr.step_count
    assert done == 3  # rge with q = 6: 7 queries x 16 rows = 112 rows a step; the oracle fails from row 336 on
    ck = load_checkpoint(tmp_path / "f" / "checkpoint.pt")
    assert ck["step"] == done
    for k, v in model.state_dict().items():
        assert torch.equal(ck["model"][k], v)


def test_common_random_numbers_give_every_query_of_a_step_its_seed_and_resume_exactly(tmp_path):
    """``crn_seed``: base and probes of step t see step_seed(crn_seed, t); a resumed run sees the same seeds."""
    from bbzo.oracle import FunctionOracle, step_seed

    def run(folder, steps, resume=False, crn_seed=11):
        seen = []

        def noisy(x, seed=None):  # a stochastic black box: seeded noise, the same draw for every row
            seen.append(seed)
            g = torch.Generator().manual_seed(seed if seed is not None else len(seen))
            return x + 0.1 * torch.randn(1, x.shape[1], generator=g, dtype=x.dtype)

        torch.manual_seed(0)
        model = nn.Linear(2, 2)
        oracle = FunctionOracle(noisy)
        obj = bbzo.OracleObjective(oracle, lambda a, out, inp, t: (a - t).pow(2).mean(1))
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(32, 2, generator=g), torch.randn(32, 2, generator=g)
        tr = Trainer(model, obj, bbzo.create_estimator("cge", mu=1e-3), torch.optim.SGD(model.parameters(), lr=0.1),
                     TensorBatches(x, y, 8, seed=3), max_steps=4, oracle=oracle, run_dir=folder, checkpoint_every=2,
                     crn_seed=crn_seed)
        if resume:
            tr.resume()
        tr.run(steps=steps)
        return model, seen

    full, seen = run(tmp_path / "a", 4)
    assert seen == [step_seed(11, t) for t in range(1, 5) for _ in range(2)]  # base call + probe call per step
    run(tmp_path / "b", 2)  # stops after step 2 (checkpointed) ...
    resumed, seen_b = run(tmp_path / "b", 2, resume=True)  # ... and a new process goes on
    assert seen_b == seen[4:]
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), resumed.parameters()))
    _, seen_off = run(tmp_path / "c", 1, crn_seed=None)
    assert seen_off == [None, None]


def test_a_signal_while_a_failed_step_saves_does_not_replace_the_error(tmp_path):
    """Under torchrun a dead peer makes this rank's step fail and the launcher's SIGTERM arrives while the
    last completed step is being saved: the step's own error must reach the report, not "stopped by SIGTERM"."""
    import os
    import signal

    from bbzo import signals

    tr, model, oracle = build(tmp_path / "f", "rge", fail_at_row=7 * 16 * 3)
    real = tr.save_checkpoint

    def save_then_signal(*a, **kw):
        if "ledger_state" in kw:  # the save of the failing step's except path (the last completed state)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)

    tr.save_checkpoint = save_then_signal
    restore = signals.install()
    try:
        with pytest.raises(OracleError, match="NaN/inf"):
            tr.run()
    finally:
        restore()
    assert load_checkpoint(tmp_path / "f" / "checkpoint.pt")["step"] == 3
