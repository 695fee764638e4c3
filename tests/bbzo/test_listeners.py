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


def _first_order(steps=3):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    x = torch.randn(16, 2)
    obj = bbzo.objective.FunctionObjective(lambda out, t: out[:, 0] ** 2)
    return bbzo.Trainer(model, obj, bbzo.create_estimator("autograd"), torch.optim.SGD(model.parameters(), lr=0.1),
                        bbzo.TensorBatches(x, None, 8), max_steps=steps)


def test_the_bar_is_on_screen_while_the_first_step_runs_and_shows_what_the_estimator_spends(capsys):
    from bbzo.listeners import ProgressBar

    seen = []
    tr, _, _ = _trainer(steps=3)
    bar = ProgressBar(desc="cge").attach(tr)
    tr.before_step.append(lambda t: seen.append(bar.bar is not None and bar.bar.n == t.step_count))
    tr.run()
    err = capsys.readouterr().err
    assert seen == [True, True, True] and "step 1 running" in err  # drawn before step 1 had finished
    assert "q_per_s=" in err and "queries=12" in err and bar.bar is None  # closed at the end
    fo = _first_order()
    ProgressBar(desc="fo").attach(fo)
    fo.run()
    err = capsys.readouterr().err
    assert "s_per_step=" in err and "q_per_s" not in err and "queries=" not in err  # no queries to show


def test_a_line_printed_while_a_bar_is_drawn_gets_its_own_line_and_stderr_is_restored(capsys):
    import re
    import sys

    from bbzo.listeners import ProgressBar

    tr, _, _ = _trainer(steps=3)
    before = sys.stderr
    ProgressBar(desc="cge").attach(tr)
    tr.after_step.append(lambda t, s: print(f"[oracle] restarted at step {t.step_count}", file=sys.stderr)
                         if t.step_count == 2 else None)
    tr.run()
    err = capsys.readouterr().err
    assert re.search(r"(^|[\r\n])\[oracle\] restarted at step 2\n", err), err  # not glued to the bar's text
    assert sys.stderr is before


def test_activity_and_counting_say_what_runs_from_the_start_and_stay_quiet_when_disabled(capsys):
    from bbzo.listeners import activity, counting

    with activity("scoring", what="386 queries"):
        pass
    with counting("test accuracy", total=10, unit="img") as tick:
        tick(4)
        tick(6)
    err = capsys.readouterr().err
    assert "scoring (386 queries): done in" in err and "test accuracy:   0%|" in err and "0/10 [" in err
    with activity("scoring", enabled=False), counting("x", total=3, enabled=False) as tick:
        tick(3)
    assert capsys.readouterr().err == ""


def test_the_loss_plot_says_what_it_plots_and_draws_the_validation_curve(tmp_path, monkeypatch):
    import bbzo.listeners as listeners

    figs = []
    monkeypatch.setattr(listeners, "save_figure", lambda fig, path: figs.append(fig) or path)
    rows = [{"step": s, "loss": 1.0 / s, "queries_used": 4 * s, **({"eval_val_loss": 2.0 / s} if s % 2 == 0 else {})}
            for s in range(1, 7)]
    plot_losses(tmp_path / "loss.png", {"cge": rows})
    steps, queries = figs[0].axes
    labels = [line.get_label() for line in steps.lines]
    assert labels == ["cge: training loss (minibatch)", "cge: validation loss"]
    val = steps.lines[1]
    assert list(val.get_xdata()) == [2, 4, 6] and val.get_linestyle() == "--"
    assert queries.get_xlabel() == "queries (parameter sets evaluated on the minibatch)"
    assert [list(line.get_xdata()) for line in queries.lines] == [[4, 8, 12, 16, 20, 24], [8, 16, 24]]


def test_an_evaluation_bar_inside_a_training_bar_draws_on_the_screen_at_once(capsys):
    from bbzo.listeners import ProgressBar, counting

    tr, _, _ = _trainer(steps=2)
    ProgressBar(desc="cge").attach(tr)

    def evaluate(t, s):
        with counting("test accuracy", total=5, unit="img") as tick:
            assert "test accuracy" in capsys.readouterr().err  # drawn now, not held back until a newline
            tick(5)
    tr.after_step.append(evaluate)
    tr.run()


def _rows(losses, objective=None, queries=0):
    extra = {"objective": objective} if objective else {}
    return [{"step": i + 1, "loss": v, "queries_used": queries * (i + 1), **extra} for i, v in enumerate(losses)]


def test_trainings_of_different_objectives_get_their_own_row(tmp_path):
    from PIL import Image

    one = plot_losses(tmp_path / "one.png", {"zo": _rows([3.0, 2.0], "4-step unrolled loss", queries=10),
                                             "fo": _rows([3.0, 1.0], "4-step unrolled loss")})
    two = plot_losses(tmp_path / "two.png", {"non": _rows([1e-3, 5e-4], "one-step loss on pairs"),
                                             "zo": _rows([3.0, 2.0], "4-step unrolled loss", queries=10)})
    plain = plot_losses(tmp_path / "plain.png", {"a": _rows([1.0, 0.5]), "b": _rows([2.0, 1.0])})
    h1, h2, h0 = (Image.open(p).size[1] for p in (one, two, plain))
    assert h2 == 2 * h1 and h0 == h1  # 3.8 in per row at 120 dpi: 456 px, 912 px
    assert h1 == 456
    assert plot_losses(tmp_path / "none.png", {"a": [{"step": 1, "loss": None}]}) is None
