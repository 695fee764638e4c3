"""Listeners: the JSONL log is strict JSON and matches the run after a resume; periodic evaluation is uncharged."""

import json

import pytest
import torch

import bbzo
from bbzo.listeners import BudgetGuard, JSONLLogger, PeriodicEval, plot_losses, read_jsonl


def _trainer(steps=4, max_queries=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1).double()
    x = torch.randn(16, 2, dtype=torch.float64)
    box = bbzo.FunctionOracle(lambda z: z.pow(2), name="sq")
    obj = bbzo.OracleObjective(box, lambda a, out, inp, t: a[:, 0], needs_inputs=False)
    ledger = bbzo.QueryLedger(max_queries=max_queries)
    ledger.attach(box)
    tr = bbzo.Trainer(model, obj, bbzo.create_estimator("cge"), torch.optim.SGD(model.parameters(), lr=0.1),
                      bbzo.TensorBatches(x, None, 8), max_steps=steps, ledger=ledger)
    return tr, obj, x


def test_jsonl_rows_are_strict_json_and_a_resume_drops_the_rows_after_the_checkpoint(tmp_path):
    tr, _, _ = _trainer()
    log = JSONLLogger(tmp_path / "m.jsonl", extra={"run": "a"}).attach(tr)
    tr.after_step.append(lambda t, s: s.update(weird=float("nan")))
    tr.run()
    text = (tmp_path / "m.jsonl").read_text()
    assert "NaN" not in text and len(text.splitlines()) == 4
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c}")) for line in text.splitlines()]
    assert rows[0]["run"] == "a" and rows[0]["weird"] is None and [r["step"] for r in rows] == [1, 2, 3, 4]
    log.truncate(2)
    assert [r["step"] for r in read_jsonl(tmp_path / "m.jsonl")] == [1, 2]


def test_periodic_evaluation_is_counted_apart_and_the_budget_guard_stops_before_overspending():
    tr, obj, x = _trainer(steps=6)
    def measure(m):
        with torch.no_grad():
            return {"loss": float(obj(m(x), x, None).mean())}

    ev = PeriodicEval(measure, every=2).attach(tr)
    tr.run()
    assert [h["step"] for h in ev.history] == [2, 4, 6] and "eval_loss" in tr.status
    assert tr.ledger.eval_queries == 0 and tr.ledger.account("sq").eval_rows == 3 * 16
    assert tr.ledger.queries == 6 * 4  # 3 parameters: 4 queries a step; the evaluations are not charged
    tr, _, _ = _trainer(steps=10, max_queries=10)
    BudgetGuard().attach(tr)
    tr.run()
    assert tr.step_count == 2 and tr.stop_reason == "max_queries" and tr.ledger.queries == 8


def test_the_loss_plot_is_drawn(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s, "queries_used": 4 * s} for s in range(1, 6)]
    path = plot_losses(tmp_path / "loss.png", {"cge": rows}, title="t")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
