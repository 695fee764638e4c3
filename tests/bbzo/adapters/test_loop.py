"""LoopAdapter: CGE through a rollout that calls the model inside a black-box loop equals autograd."""

import pytest
import torch
from torch import nn

import bbzo
from bbzo.adapters import LoopAdapter
from bbzo.errors import ConfigError, ShapeError
from bbzo.oracle import FunctionOracle
from bbzo.step import estimate


def _problem():
    g = torch.Generator().manual_seed(0)
    a = torch.eye(4, dtype=torch.float64) + 0.1 * torch.randn(4, 4, generator=g, dtype=torch.float64)
    solver = FunctionOracle(lambda s: torch.tanh(s @ a.T), name="toy-solver")
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    y = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)

    def make(step):
        def rollout(model_fn, s, targets):
            loss = torch.zeros(s.shape[0], dtype=s.dtype)
            for t in range(targets.shape[1]):
                s = step(s)
                s = s + 0.5 * model_fn(s)
                loss = loss + ((s - targets[:, t]) ** 2).sum(1)
            return loss / targets.shape[1]
        return rollout

    white = lambda s: torch.tanh(s @ a.T)  # the same map, differentiable (the FO reference)
    nog = make(lambda s: solver.query(s.detach()))  # the stop-gradient surrogate: the solver's output a constant
    rollout = bbzo.Rollout(make(solver.query), surrogate=nog)
    return solver, model, x, y, rollout, make(white)


def test_cge_through_rollout_matches_autograd():
    solver, model, x, y, rollout, white_rollout = _problem()
    loss = white_rollout(model, x, y).mean()
    fo = torch.autograd.grad(loss, list(model.parameters()))
    est = bbzo.create_estimator("cge", mu=1e-6, difference="central")
    adapter = LoopAdapter(model, sets_per_call=7)
    zo = estimate(adapter, est, rollout, x, y)
    for (n, _), g in zip(model.named_parameters(), fo):
        assert torch.allclose(zo.grads[n], g, rtol=1e-6, atol=1e-8), n
    d = sum(p.numel() for p in model.parameters())
    assert zo.queries == 2 * d
    # every oracle call carried K*B rows: the 2d probes in chunks of 7 sets x 3 samples x 5 steps
    assert solver.rows_used == 2 * d * 3 * 5
    assert solver.calls_used == -(-2 * d // 7) * 5


def test_base_loss_is_the_plain_rollout():
    _, model, x, y, rollout, white_rollout = _problem()
    ev = LoopAdapter(model).bind(rollout, x, y)
    torch.testing.assert_close(ev.base_losses(), white_rollout(model, x, y).detach(), rtol=0, atol=1e-14)


def test_the_surrogate_gradient_is_nog_and_its_forward_is_the_base_query():
    """hybrid_cge on a rollout: the detached-solver gradient (NOG) off the drawn coordinates, finite differences on
    them, and the surrogate's forward pass is the base query (Sparse-CGE's cost)."""
    solver, model, x, y, rollout, white_rollout = _problem()
    nog = torch.autograd.grad(rollout.surrogate(model, x, y).mean(), list(model.parameters()))
    full = torch.autograd.grad(white_rollout(model, x, y).mean(), list(model.parameters()))
    names = [n for n, _ in model.named_parameters()]
    coords = {"0.weight": torch.tensor([0, 5, 11])}
    est = bbzo.create_estimator("hybrid_cge", coords=coords, mu=1e-6, difference="central")
    rows0 = solver.rows_used
    res = estimate(LoopAdapter(model, sets_per_call=4), est, rollout, x, y)
    assert res.queries == 2 * 3 + 1 and solver.rows_used - rows0 == (2 * 3 + 1) * 3 * 5
    for n, g_nog, g_full in zip(names, nog, full):
        g = res.grads[n].flatten()
        drawn = torch.zeros(g.numel(), dtype=torch.bool)
        if n in coords:
            drawn[coords[n]] = True
            torch.testing.assert_close(g[drawn], g_full.flatten()[drawn], rtol=1e-6, atol=1e-8)  # through the solver
        torch.testing.assert_close(g[~drawn], g_nog.flatten()[~drawn], rtol=0, atol=1e-14)  # NOG, exactly
    assert float((nog[0] - full[0]).abs().max()) > 1e-3  # the two gradients differ: the test can tell them apart
    assert res.loss == pytest.approx(float(white_rollout(model, x, y).mean().detach()), rel=1e-12)


def test_model_fn_must_see_every_row_and_rollout_must_be_per_sample():
    _, model, x, y, _, _ = _problem()
    est = bbzo.create_estimator("cge")
    with pytest.raises(ConfigError, match="all N = K\\*B"):
        estimate(LoopAdapter(model), est, lambda f, s, t: f(s[:1]).sum(1).repeat(s.shape[0]), x, y)
    with pytest.raises(ShapeError, match="per-sample"):
        estimate(LoopAdapter(model), bbzo.create_estimator("cge"), lambda f, s, t: f(s).sum(), x, y)
