"""The failure policy: rows the black box cannot answer stop the step, or are resolved -- the samples skipped for
every probe alike, or penalized by a bounded uphill slope -- for every estimator, the chain rule included."""

import math

import pytest
import torch

import bbzo
from bbzo.adapters import make_adapter
from bbzo.failures import FailurePolicy
from bbzo.ledger import QueryLedger
from bbzo.oracle import answering_failures_with_nan
from bbzo.oracles.process.protocol import Transport, parse_reply
from bbzo.probes import CoordinateProbes
from bbzo.step import Evaluation, Request, estimate
from tests.helpers import mlp64


def _setup():
    torch.manual_seed(0)
    model = mlp64()
    x = torch.randn(10, 4, dtype=torch.float64)
    x[3] += 50.0  # samples 3 and 7 drive the simulator out of its range
    x[7] -= 50.0

    def sim(rows):  # rows = (3 model outputs, the sample's 4 conditions); fails where a condition is out of range
        out = torch.tanh(rows[:, :3]).sum(1, keepdim=True)
        out[rows[:, 3:].abs().max(1).values > 5] = float("nan")
        return out

    oracle = bbzo.FunctionOracle(sim, name="fragile")
    obj = bbzo.OracleObjective(oracle, lambda a, out, inp, t: (a[:, 0] - 1).pow(2),
                               assemble=lambda out, inp, t: torch.cat([out, inp], 1))
    return model, x, oracle, obj


KEEP = torch.tensor([i not in (3, 7) for i in range(10)])


def _norm(g):
    return math.sqrt(sum(float((v ** 2).sum()) for v in g.values()))


def test_stop_names_the_rows():
    model, x, oracle, obj = _setup()
    with pytest.raises(bbzo.OracleError, match="NaN/inf in 2 of 10 rows"):
        bbzo.estimate_grad(model, obj, x, None, bbzo.create_estimator("cge"))


@pytest.mark.parametrize("name", ["cge", "oracle_cge"])
def test_skip_equals_the_estimate_without_the_failed_samples_at_no_extra_query(name):
    model, x, oracle, obj = _setup()
    ledger = QueryLedger()
    ledger.attach(oracle)
    est = bbzo.create_estimator(name, mu=1e-6)
    a = estimate(make_adapter(model), est, obj, x, None, ledger=ledger, policy=FailurePolicy("skip"))
    b = estimate(make_adapter(model), est, obj, x[KEEP], None)
    for k in a.grads:  # the same samples, evaluated in a batch of 10 instead of 8: equal up to a few ulps
        torch.testing.assert_close(a.grads[k], b.grads[k], rtol=1e-9, atol=1e-12)
    assert a.loss == pytest.approx(b.loss, rel=1e-12)
    assert a.dropped_samples == 2 and a.penalized_rows == 0
    d = sum(p.numel() for p in model.parameters()) if name == "cge" else 3
    assert a.failed_rows == 2 * (d + 1)  # both samples fail in the base and in every probe
    assert a.queries == ledger.queries == d + 1  # nothing is evaluated again


def test_penalize_replaces_a_failed_entry_by_the_steepest_answered_slope_uphill():
    """The rule on a hand-made evaluation: 2 probes (mu = 0.1), 3 samples, one failed entry per probe."""
    nan = float("nan")
    per = torch.tensor([[1.2, nan, 3.1], [nan, 2.5, 2.6]], dtype=torch.float64)
    base = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    probes = CoordinateProbes(("w",), torch.zeros(2, dtype=torch.int64), torch.arange(2),
                              torch.tensor([0.1, 0.1], dtype=torch.float64))
    request = Request(probes, base=True, per_sample=True)
    told = FailurePolicy("penalize", penalty=2.0).resolve(Evaluation(per.mean(1), per, base), request)
    # probe 0: answered slopes |1.2-1|/0.1 = 2, |3.1-3|/0.1 = 1 -> steepest 2; the failed entry: 2.0 + 0.1*2*2 = 2.4
    # probe 1: slopes 5 and 4 -> steepest 5; the failed entry: 1.0 + 0.1*2*5 = 2.0
    torch.testing.assert_close(told.per_sample, torch.tensor([[1.2, 2.4, 3.1], [2.0, 2.5, 2.6]], dtype=torch.float64))
    torch.testing.assert_close(told.losses, torch.tensor([6.7 / 3, 7.1 / 3], dtype=torch.float64))
    assert (told.failed_rows, told.penalized_rows, told.dropped_samples) == (2, 2, 0) and told.loss == 2.0
    # a sample whose base failed is put uphill of its highest answered probe (the answered directions lead out):
    # sample 2 answered 3.1 and 2.6; the steepest answered slope of the step is 5 -> base 3.1 + 0.1 * 5 = 3.6
    base_bad = base.clone()
    base_bad[2] = nan
    told = FailurePolicy("penalize").resolve(Evaluation(per.mean(1), per, base_bad), request)
    torch.testing.assert_close(told.base_per_sample, torch.tensor([1.0, 2.0, 3.6], dtype=torch.float64))
    assert told.keep.all() and (told.failed_rows, told.penalized_rows) == (3, 3)
    assert float(told.per_sample[0, 2] - told.base_per_sample[2]) < 0  # downhill along the answered probes
    # with no answered entry at all a sample carries no information: dropped
    per_bad = per.clone()
    per_bad[:, 2] = nan
    told = FailurePolicy("penalize").resolve(Evaluation(per_bad.mean(1), per_bad, base_bad), request)
    assert told.keep.tolist() == [True, True, False] and told.dropped_samples == 1


def test_penalize_keeps_the_gradient_in_the_range_of_a_run_without_failures():
    """A fixed penalty over mu would be a finite difference of ~penalty/mu; the bounded slope is not."""
    model, x, oracle, obj = _setup()
    est = bbzo.create_estimator("cge", mu=1e-3)
    clean = estimate(make_adapter(model), est, obj, x[KEEP], None).grads
    pen = estimate(make_adapter(model), est, obj, x, None, policy=FailurePolicy("penalize"))
    assert pen.dropped_samples == 2  # samples 3 and 7 fail in the base and in every probe: no information
    # sporadic failures: the black box fails on an output 0 above the largest one of the unperturbed batch, i.e. for
    # one sample in the probes that push its output up -- a fixed penalty over mu would swamp those coordinates
    xk = x[KEEP]
    with torch.no_grad():
        top = float(model(xk)[:, 0].max()) + 1e-12
    fragile = bbzo.FunctionOracle(lambda r: torch.where(r[:, :1] > top, float("nan"),
                                                        torch.tanh(r[:, :3]).sum(1, keepdim=True)), name="sporadic")
    obj2 = bbzo.OracleObjective(fragile, lambda a, out, inp, t: (a[:, 0] - 1).pow(2), needs_inputs=False)
    free = estimate(make_adapter(model), est, bbzo.OracleObjective(
        bbzo.FunctionOracle(lambda r: torch.tanh(r[:, :3]).sum(1, keepdim=True)),
        lambda a, out, inp, t: (a[:, 0] - 1).pow(2), needs_inputs=False), xk, None).grads
    hit = estimate(make_adapter(model), est, obj2, xk, None, policy=FailurePolicy("penalize"))
    assert hit.penalized_rows > 0 and hit.dropped_samples == 0
    assert 0.2 < _norm(hit.grads) / _norm(free) < 5, (_norm(hit.grads), _norm(free))
    assert _norm(clean) > 0


@pytest.mark.parametrize("name", ["cge", "oracle_cge", "rge"])
def test_penalize_asks_for_the_base_with_central_differences(name):
    model, x, oracle, obj = _setup()
    kw = {"q": 4} if name == "rge" else {}
    est = bbzo.create_estimator(name, mu=1e-4, difference="central", **kw)
    params = {n: p.detach() for n, p in model.named_parameters()}
    if name == "oracle_cge":
        est = bbzo.create_estimator(name, mu=1e-4, difference="central", width=3)
    res = estimate(make_adapter(model), est, obj, x, None, policy=FailurePolicy("penalize"))
    assert res.queries == est.query_cost(params) + 1
    assert all(torch.isfinite(g).all() for g in res.grads.values())


def test_skip_with_every_sample_failing_says_what_to_do():
    model, x, oracle, obj = _setup()
    with pytest.raises(bbzo.OracleError, match="every sample has an entry.*penalize"):
        estimate(make_adapter(model), bbzo.create_estimator("cge"), obj, x[[3, 7]], None, policy=FailurePolicy("skip"))


def test_oracles_answer_nan_only_inside_the_tolerant_scope():
    _, _, oracle, _ = _setup()
    rows = torch.zeros(2, 7, dtype=torch.float64)
    rows[1, 5] = 99.0
    with pytest.raises(bbzo.OracleError, match="NaN/inf in 1 of 2 rows"):
        oracle.query(rows)
    with answering_failures_with_nan():
        out = oracle.query(rows)
    assert math.isnan(float(out[1, 0])) and math.isfinite(float(out[0, 0]))
    with pytest.raises(bbzo.OracleError):
        oracle.query(rows)  # the scope has ended


def test_policy_settings_are_checked():
    with pytest.raises(bbzo.ConfigError, match="must be one of stop, penalize, skip"):
        FailurePolicy("ignore")
    with pytest.raises(bbzo.ConfigError, match="must be > 0"):
        FailurePolicy("penalize", penalty=0)


def test_the_protocol_reports_failed_rows_as_nan():
    buf = bytearray(b"ok 3 2 failed=1\n1 2\nfail fail\n5 6\n")
    out = parse_reply(buf, 3, 2, "text")
    assert out.shape == (3, 2) and out[0].tolist() == [1, 2] and out[2].tolist() == [5, 6]
    assert all(v != v for v in out[1])  # NaN
    with pytest.raises(Transport, match="outside 0..2"):
        parse_reply(bytearray(b"ok 3 2 failed=5\n1 2\n3 4\n5 6\n"), 3, 2, "text")
