"""The failure policy: rows the oracle cannot answer stop the run, are penalized, or their samples are skipped
for every perturbation of the step alike."""

import pytest
import torch

import bbzo
from bbzo.failures import FailurePolicy
from bbzo.ledger import QueryLedger
from oracles.process.protocol import parse_reply
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


def test_stop_names_the_rows():
    model, x, oracle, obj = _setup()
    with pytest.raises(bbzo.OracleError, match="NaN/inf in"):
        bbzo.estimate_grad(model, obj, x, None, bbzo.create_estimator("cge"))


def test_skip_equals_the_estimate_without_the_failed_samples():
    model, x, oracle, obj = _setup()
    ledger = QueryLedger()
    ledger.attach(oracle)
    oracle.allow_nonfinite = True
    policy = FailurePolicy("skip")
    a = bbzo.estimate(bbzo.make_adapter(model), bbzo.create_estimator("cge"), obj, x, None, ledger=ledger,
                      failures=policy)
    keep = torch.tensor([i not in (3, 7) for i in range(10)])
    oracle.allow_nonfinite = False
    b = bbzo.estimate(bbzo.make_adapter(model), bbzo.create_estimator("cge"), obj, x[keep], None)
    assert all(torch.equal(a.grads[k], b.grads[k]) for k in a.grads) and a.loss == b.loss
    assert policy.skipped_samples == 2 and policy.failed_rows > 0
    d = sum(p.numel() for p in model.parameters())
    assert a.queries > d + 1  # the step was evaluated again on the remaining samples; both passes are charged


def test_penalize_gives_failed_rows_the_penalty():
    model, x, oracle, obj = _setup()
    oracle.allow_nonfinite = True
    policy = FailurePolicy("penalize", penalty=7.0)
    res = bbzo.estimate(bbzo.make_adapter(model), bbzo.create_estimator("cge"), obj, x, None, failures=policy)
    keep = torch.tensor([i not in (3, 7) for i in range(10)])
    with torch.no_grad():
        good = float((torch.tanh(model(x[keep])).sum(1) - 1).pow(2).sum())
    assert res.loss == pytest.approx((good + 2 * 7.0) / 10)
    assert policy.failed_rows >= 2 * (sum(p.numel() for p in model.parameters()) + 1)  # in every query alike


def test_the_protocol_reports_failed_rows_as_nan():
    buf = bytearray(b"ok 3 2 failed=1\n1 2\nfail fail\n5 6\n")
    out = parse_reply(buf, 3, 2, "text")
    assert out.shape == (3, 2) and out[0].tolist() == [1, 2] and out[2].tolist() == [5, 6]
    assert all(v != v for v in out[1])  # NaN
    with pytest.raises(Exception, match="outside 0..2"):
        parse_reply(bytearray(b"ok 3 2 failed=5\n1 2\n3 4\n5 6\n"), 3, 2, "text")
