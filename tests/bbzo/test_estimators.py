"""Every registered estimator against autograd (float64), and query accounting."""

import math

import pytest
import torch

import bbzo
from bbzo.errors import ConfigError
from tests.helpers import SpyOracle, autograd_grads, mlp64, problems, rel_err

PROBLEMS = problems()


def make(name, **kw):
    if name == "sparse_cge":
        return None  # built per model below
    return bbzo.create_estimator(name, **kw)


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("feature_reuse", [False, "auto"])
def test_cge_matches_autograd(problem, feature_reuse):
    model, x, y, loss_fn = PROBLEMS[problem]
    ref = autograd_grads(model, x, y, loss_fn)
    fwd = bbzo.estimate_grad(model, loss_fn, x, y, bbzo.create_estimator("cge", mu=1e-6), feature_reuse=feature_reuse)
    cen = bbzo.estimate_grad(model, loss_fn, x, y, bbzo.create_estimator("cge", mu=1e-5, difference="central"),
                             feature_reuse=feature_reuse)
    e_fwd, e_cen = rel_err(fwd, ref), rel_err(cen, ref)
    assert e_fwd <= 1e-5, e_fwd
    assert e_cen <= 1e-7, e_cen
    assert e_cen < e_fwd


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_sparse_cge_equals_cge_on_its_set_and_zero_elsewhere(problem):
    model, x, y, loss_fn = PROBLEMS[problem]
    params = {n: p for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(5)
    named = list(params.items())
    named = named[:-1] if len(named) > 1 else named  # leave the last tensor out of the set
    coords = {n: torch.rand(p.shape, generator=g) < 0.4 for n, p in named}
    dense = bbzo.estimate_grad(model, loss_fn, x, y, bbzo.create_estimator("cge", mu=1e-6))
    sparse = bbzo.estimate_grad(model, loss_fn, x, y, bbzo.create_estimator("sparse_cge", coords=coords, mu=1e-6))
    n_set = 0
    for n, p in params.items():
        mask = coords.get(n, torch.zeros(p.shape, dtype=torch.bool))
        n_set += int(mask.sum())
        assert torch.equal(sparse[n][~mask], torch.zeros_like(sparse[n][~mask]))
        assert torch.allclose(sparse[n][mask], dense[n][mask], rtol=0, atol=1e-12)
    assert n_set > 0


@pytest.mark.parametrize("distribution", ["gaussian", "sphere"])
@pytest.mark.parametrize("difference", ["forward", "central"])
def test_rge_is_unbiased_within_statistical_tolerance(distribution, difference):
    """Mean of N independent RGE draws -> true gradient; error within 5 sigma of the predicted spread."""
    model, x, y, loss_fn = PROBLEMS["mlp"]
    ref = autograd_grads(model, x, y, loss_fn)
    d = sum(v.numel() for v in ref.values())
    q, draws = 8, 400
    est = bbzo.create_estimator("rge", q=q, mu=1e-6, distribution=distribution, difference=difference, seed=11)
    adapter = bbzo.make_adapter(model)
    acc = {k: torch.zeros_like(v) for k, v in ref.items()}
    for _ in range(draws):
        g = bbzo.estimate(adapter, est, loss_fn, x, y).grads
        for k in acc:
            acc[k] += g[k] / draws
    g2 = sum(float((v ** 2).sum()) for v in ref.values())
    err2 = sum(float(((acc[k] - ref[k]) ** 2).sum()) for k in ref)
    # Gaussian: E||g_hat - g||^2 = (d + 1) ||g||^2 / q per draw (sphere: smaller)
    sigma = math.sqrt((d + 1) * g2 / (q * draws))
    assert math.sqrt(err2) < 5 * sigma, (math.sqrt(err2), sigma)
    # and it is not trivially small: a single draw is far from the truth
    one = bbzo.estimate(adapter, est, loss_fn, x, y).grads
    assert rel_err(one, ref) > 0.3


def test_rge_directions_change_every_step_and_are_reproducible():
    model, x, y, loss_fn = PROBLEMS["mlp"]
    a = bbzo.create_estimator("rge", q=4, seed=3)
    b = bbzo.create_estimator("rge", q=4, seed=3)
    g1 = bbzo.estimate_grad(model, loss_fn, x, y, a, set_grad=False)
    g2 = bbzo.estimate_grad(model, loss_fn, x, y, a, set_grad=False)
    h1 = bbzo.estimate_grad(model, loss_fn, x, y, b, set_grad=False)
    assert all(torch.equal(g1[k], h1[k]) for k in g1)
    assert not all(torch.equal(g1[k], g2[k]) for k in g1)


ESTIMATORS = {
    "cge": lambda params: bbzo.create_estimator("cge"),
    "cge-central": lambda params: bbzo.create_estimator("cge", difference="central"),
    "sparse_cge": lambda params: bbzo.create_estimator(
        "sparse_cge", coords={n: torch.arange(0, p.numel(), 3) for n, p in params.items()}),
    "sparse_cge-central": lambda params: bbzo.create_estimator(
        "sparse_cge", coords={n: torch.arange(0, p.numel(), 2) for n, p in params.items()}, difference="central"),
    "rge": lambda params: bbzo.create_estimator("rge", q=5),
    "rge-central": lambda params: bbzo.create_estimator("rge", q=5, difference="central"),
}


def test_every_registered_estimator_is_covered():
    assert {k.split("-")[0] for k in ESTIMATORS} == set(bbzo.list_estimators())


@pytest.mark.parametrize("name", list(ESTIMATORS))
@pytest.mark.parametrize("feature_reuse", [False, "auto"])
def test_queries_used_equal_declared_cost_and_oracle_sees_no_grad(name, feature_reuse):
    model = mlp64()
    params = dict(model.named_parameters())
    est = ESTIMATORS[name](params)
    oracle = SpyOracle(3, 2)
    x = torch.randn(8, 4, dtype=torch.float64)
    loss_fn = lambda out, t: oracle.query(out).pow(2).sum(1)  # noqa: E731
    adapter = bbzo.make_adapter(model, feature_reuse=feature_reuse, max_chunk=7)
    declared = est.query_cost({n: p.detach() for n, p in params.items()})
    res = bbzo.estimate(adapter, est, loss_fn, x, None)
    assert res.queries == declared
    assert oracle.rows_used == declared * 8
    assert oracle.calls_used == res.calls > 1  # chunked
    assert oracle.saw_requires_grad and not any(oracle.saw_requires_grad)
    d = sum(p.numel() for p in params.values())
    expected = {"cge": d + 1, "cge-central": 2 * d, "rge": 6, "rge-central": 10}
    if name in expected:
        assert declared == expected[name]


def test_registry_errors_are_clear():
    with pytest.raises(ConfigError, match="registered: .*cge"):
        bbzo.create_estimator("nope")
    with pytest.raises(ConfigError, match="unexpected keyword"):
        bbzo.create_estimator("cge", q=3)
    with pytest.raises(ConfigError, match="mu must be > 0"):
        bbzo.create_estimator("cge", mu=0)
    with pytest.raises(ConfigError, match="already registered"):
        bbzo.register_estimator(bbzo.estimators.CGE)
    infos = bbzo.list_estimators(with_info=True)
    assert {i.name for i in infos} == {"cge", "sparse_cge", "rge"}
    assert bbzo.list_estimators("*cge") == ["cge", "sparse_cge"]


def test_sparse_coords_validation():
    model = mlp64()
    est = bbzo.create_estimator("sparse_cge", coords={"missing.weight": torch.tensor([0])})
    with pytest.raises(ConfigError, match="not trainable"):
        bbzo.estimate_grad(model, lambda o, t: o.sum(1), torch.randn(2, 4, dtype=torch.float64), None, est)
    est = bbzo.create_estimator("sparse_cge", coords={"0.weight": torch.tensor([10_000])})
    with pytest.raises(bbzo.ShapeError, match=r"\[0, 24\)"):
        bbzo.estimate_grad(model, lambda o, t: o.sum(1), torch.randn(2, 4, dtype=torch.float64), None, est)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grads_keep_dtype_shape_and_land_in_param_grad(dtype):
    model = mlp64().to(dtype)
    x = torch.randn(5, 4, dtype=dtype)
    g = bbzo.estimate_grad(model, lambda o, t: o.pow(2).sum(1), x, None, bbzo.create_estimator("cge"))
    assert list(g) == [n for n, _ in model.named_parameters()]
    for n, p in model.named_parameters():
        assert g[n].dtype == dtype and g[n].shape == p.shape
        assert torch.equal(p.grad, g[n])


def test_frozen_parameters_are_not_estimated():
    model = mlp64()
    model[0].weight.requires_grad_(False)
    g = bbzo.estimate_grad(model, lambda o, t: o.pow(2).sum(1), torch.randn(3, 4, dtype=torch.float64), None,
                           bbzo.create_estimator("cge"))
    assert "0.weight" not in g and "0.bias" in g
