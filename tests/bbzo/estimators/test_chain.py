"""The chain-rule estimators (oracle_cge / oracle_rge): finite differences in the model's output space only."""

from __future__ import annotations

import pytest
import torch

import bbzo
from bbzo.errors import ConfigError
from bbzo.ledger import QueryLedger
from bbzo.step import estimate
from bbzo.adapters import make_adapter

W = torch.tensor([[0.7, -0.2], [0.1, 0.9], [-0.5, 0.3], [0.4, 0.4]], dtype=torch.float64)


def smooth(rows: torch.Tensor) -> torch.Tensor:
    """A differentiable stand-in for a simulator: (N, 4) -> (N, 2)."""
    return torch.sin(rows) @ W + 0.1 * rows[:, :2] ** 2


def setup(kind: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, 2, dtype=torch.float64)
    if kind == "outputs+inputs":
        def assemble(out, inp, t):
            return torch.cat([out, inp[:, :1]], 1)
    else:  # outputs+targets
        def assemble(out, inp, t):
            return torch.cat([out, t[:, :1]], 1)

    def loss(answers, out, inp, t):  # the oracle's answer against the target, plus a direct term on the outputs
        return (answers - t).pow(2).sum(1) + 0.05 * out.pow(2).sum(1)

    oracle = bbzo.FunctionOracle(smooth, name="smooth")
    obj = bbzo.OracleObjective(oracle, loss, assemble, needs_inputs=(kind == "outputs+inputs"))
    with torch.enable_grad():
        out = model(x)
        ref = loss(smooth(assemble(out, x, y)), out, x, y).mean()
        truth = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(ref, list(model.parameters()))))
    return model, x, y, obj, oracle, truth


def rel(g, truth) -> float:
    num = sum(float((g[k] - truth[k]).pow(2).sum()) for k in truth) ** 0.5
    return num / sum(float(v.pow(2).sum()) for v in truth.values()) ** 0.5


@pytest.mark.parametrize("kind", ["outputs+inputs", "outputs+targets"])
@pytest.mark.parametrize("difference,mu,tol", [("central", 1e-5, 1e-8), ("forward", 1e-7, 1e-5)])
def test_oracle_cge_equals_autograd_through_a_differentiable_oracle_in_float64(kind, difference, mu, tol):
    model, x, y, obj, oracle, truth = setup(kind)
    ledger = QueryLedger()
    ledger.attach(oracle)
    est = bbzo.create_estimator("oracle_cge", mu=mu, difference=difference)
    res = estimate(make_adapter(model), est, obj, x, y, ledger=ledger)
    assert rel(res.grads, truth) < tol, rel(res.grads, truth)
    width = 3  # the model's 3 outputs: each is moved for every sample at once (the appended input/target is not)
    assert res.queries == ledger.queries == (width + 1 if difference == "forward" else 2 * width)
    # one call holds every probe (and the base its own): rows = queries x samples
    assert ledger.calls(oracle) == (2 if difference == "forward" else 1) and ledger.rows(oracle) == res.queries * x.shape[0]
    # and an estimator scaled wrong would fail: the check resolves a 1% error
    assert rel({k: 1.01 * v for k, v in res.grads.items()}, truth) > 10 * tol


def test_oracle_rge_is_unbiased_in_the_output_space():
    model, x, y, obj, _, truth = setup("outputs+inputs")
    est = bbzo.create_estimator("oracle_rge", q=4, mu=1e-6)
    adapter = make_adapter(model)
    draws = 400
    acc, state = None, None
    for _ in range(draws):
        res = estimate(adapter, est, obj, x, y, state=state)
        g, state = res.grads, res.state
        acc = g if acc is None else {k: acc[k] + g[k] for k in g}
    mean = {k: v / draws for k, v in acc.items()}
    assert rel(mean, truth) < 0.1 and rel({k: 0.7 * v for k, v in mean.items()}, truth) > 0.1


def test_any_objective_works_and_a_rollout_is_refused():
    """The black box is everything after the model's outputs: a plain loss function works as well (exact in float64);
    a model inside a rollout has no outputs to perturb, and the estimators say so."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    plain = lambda out, t: torch.sin(out).pow(2).sum(1) + out[:, 0] * out[:, 1]  # noqa: E731
    with torch.enable_grad():
        ref = torch.autograd.grad(plain(model(x), None).mean(), list(model.parameters()))
    truth = dict(zip([n for n, _ in model.named_parameters()], ref))
    g = estimate(make_adapter(model), bbzo.create_estimator("oracle_cge", mu=1e-5, difference="central"), plain, x,
                 None).grads
    assert rel(g, truth) < 1e-8
    from bbzo.adapters import LoopAdapter

    for name in ("oracle_cge", "oracle_rge"):
        with pytest.raises(ConfigError, match="model -> black box split"):
            estimate(LoopAdapter(model), bbzo.create_estimator(name), lambda f, s, t: f(s).sum(1), x, None)


def test_oracle_cge_cost_does_not_depend_on_the_model_size():
    for hidden in (4, 400):
        model = torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3)).double()
        x = torch.randn(5, 3, dtype=torch.float64)
        y = torch.randn(5, 2, dtype=torch.float64)
        obj = bbzo.OracleObjective(bbzo.FunctionOracle(lambda r: smooth(torch.cat([r, r[:, :1]], 1))),
                                   lambda a, out, inp, t: (a - t).pow(2).sum(1), needs_inputs=False)
        res = estimate(make_adapter(model), bbzo.create_estimator("oracle_cge", mu=1e-6), obj, x, y)
        assert res.queries == 3 + 1
