"""Objectives see outputs, inputs and targets row by row; the stop-gradient surrogate has the objective's value."""

import pytest
import torch

import bbzo
from bbzo.objective import FunctionObjective, as_objective


def test_plain_functions_become_objectives_by_their_arity():
    two = as_objective(lambda out, t: out.sum(1))
    three = as_objective(lambda out, inp, t: out.sum(1) + inp.sum(1))
    assert not two.needs_inputs and three.needs_inputs and as_objective(three) is three
    out, inp = torch.ones(2, 3), torch.full((2, 1), 2.0)
    assert two(out, inp, None).tolist() == [3.0, 3.0] and three(out, inp, None).tolist() == [5.0, 5.0]
    with pytest.raises(bbzo.ConfigError, match="must be callable"):
        FunctionObjective(3)


def test_oracle_objective_assembles_rows_queries_and_scores():
    seen = []
    box = bbzo.FunctionOracle(lambda r: (seen.append(r.shape), r.sum(1, keepdim=True))[1], name="sum")
    obj = bbzo.OracleObjective(box, lambda a, out, inp, t: (a[:, 0] - t).pow(2),
                               assemble=lambda out, inp, t: torch.cat([out, inp], 1))
    out, inp, t = torch.ones(4, 2), torch.zeros(4, 1), torch.full((4,), 2.0)
    assert obj(out, inp, t).tolist() == [0.0] * 4 and seen == [torch.Size([4, 3])] and obj.oracles == (box,)
    assert obj.surrogate is None and "sum" in repr(obj)


def test_a_rollout_and_its_surrogate_have_the_same_value_and_different_gradients():
    box = bbzo.FunctionOracle(lambda s: torch.tanh(s), name="solver")

    def run(step):
        def rollout(model_fn, s, targets):
            for _ in range(3):
                s = step(s)
                s = s + model_fn(s)
            return (s - targets).pow(2).sum(1)
        return rollout

    rollout = bbzo.Rollout(run(box.query), surrogate=run(lambda s: box.query(s.detach())), oracles=[box])
    white = run(torch.tanh)
    model = torch.nn.Linear(2, 2).double()
    x, y = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    with torch.no_grad():
        value = rollout(model, x, y)
    sur = rollout.surrogate(model, x, y)
    torch.testing.assert_close(sur.detach(), value, rtol=0, atol=0)  # the same value, to the bit
    g_sur = torch.autograd.grad(sur.mean(), model.weight)[0]
    g_full = torch.autograd.grad(white(model, x, y).mean(), model.weight)[0]
    assert float((g_sur - g_full).abs().max()) > 1e-3 and rollout.oracles == (box,)
    with pytest.raises(bbzo.ConfigError, match="must be callables"):
        bbzo.Rollout(run(box.query), surrogate=3)
