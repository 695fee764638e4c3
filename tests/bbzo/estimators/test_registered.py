"""Every registered estimator against autograd (float64), and query accounting."""

import math

import pytest
import torch

import bbzo
from bbzo.errors import ConfigError
from bbzo.ledger import QueryLedger
from bbzo.step import estimate
from bbzo.adapters import make_adapter
from tests.helpers import SpyOracle, autograd_grads, grad, mlp64, problems, rel_err

PROBLEMS = problems()


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("feature_reuse", [False, "auto"])
def test_cge_matches_autograd(problem, feature_reuse):
    model, x, y, loss_fn = PROBLEMS[problem]
    ref = autograd_grads(model, x, y, loss_fn)
    fwd = grad(model, loss_fn, x, y, bbzo.create_estimator("cge", mu=1e-6), feature_reuse=feature_reuse)
    cen = grad(model, loss_fn, x, y, bbzo.create_estimator("cge", mu=1e-5, difference="central"),
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
    dense = grad(model, loss_fn, x, y, bbzo.create_estimator("cge", mu=1e-6))
    sparse = grad(model, loss_fn, x, y, bbzo.create_estimator("sparse_cge", coords=coords, mu=1e-6))
    n_set = 0
    for n, p in params.items():
        mask = coords.get(n, torch.zeros(p.shape, dtype=torch.bool))
        n_set += int(mask.sum())
        assert torch.equal(sparse[n][~mask], torch.zeros_like(sparse[n][~mask]))
        # a full sweep's conv probes go through the fused [BN] [act] pool path in batch blocks, a scattered set
        # stage by stage: the same values up to a few ulps of the loss over mu (one ulp / 1e-6 = 2.2e-10)
        assert torch.allclose(sparse[n][mask], dense[n][mask], rtol=0, atol=1e-9)
    assert n_set > 0


def _rge_mean(model, x, y, loss_fn, draws, **kw):
    est = bbzo.create_estimator("rge", mu=1e-6, seed=11, **kw)
    adapter = make_adapter(model)
    acc, state = None, None
    for _ in range(draws):
        res = estimate(adapter, est, loss_fn, x, y, state=state)
        g, state = res.grads, res.state
        acc = {k: v / draws for k, v in g.items()} if acc is None else {k: acc[k] + g[k] / draws for k in acc}
    return acc


def _err(a, b):
    return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in b))


def _within(mean, ref, d, q, draws):
    """Mean of ``draws`` estimates within 5 sigma of the truth: E||g_hat - g||^2 = (d + 1) ||g||^2 / q per draw."""
    g = math.sqrt(sum(float((v ** 2).sum()) for v in ref.values()))
    return _err(mean, ref) < 5 * math.sqrt((d + 1) / (q * draws)) * g


@pytest.mark.parametrize("distribution", ["gaussian", "sphere"])
@pytest.mark.parametrize("difference", ["forward", "central"])
def test_rge_is_unbiased_and_the_test_would_catch_a_scaled_estimate(distribution, difference):
    """Mean of N independent RGE draws -> true gradient; an estimate scaled by 0.5x or 1.5x fails the same check."""
    model, x, y, loss_fn = PROBLEMS["quadratic"]
    ref = autograd_grads(model, x, y, loss_fn)
    q, draws = 8, 400
    mean = _rge_mean(model, x, y, loss_fn, draws, q=q, distribution=distribution, difference=difference)
    assert _within(mean, ref, 7, q, draws), _err(mean, ref)
    for scale in (0.5, 1.5):
        assert not _within({k: scale * v for k, v in mean.items()}, ref, 7, q, draws)
    one = estimate(make_adapter(model), bbzo.create_estimator("rge", q=q, seed=5), loss_fn, x, y).grads
    assert rel_err(one, ref) > 0.1  # a single draw is far from the truth: the averaging is what is tested


def test_tensor_sphere_directions_rescale_the_gradient_per_tensor():
    """Unit norm per tensor: E[u u^T] = blockdiag(I / d_l), so the mean is g_l / d_l (ZO-GraSP's directions)."""
    qm, dm = PROBLEMS["quadratic"][0], 7
    xq, lq = PROBLEMS["quadratic"][1], PROBLEMS["quadratic"][3]
    refq = autograd_grads(qm, xq, None, lq)
    ts = _rge_mean(qm, xq, None, lq, 400, q=8, distribution="tensor_sphere")
    scaled = {k: v / dm for k, v in refq.items()}
    assert rel_err(ts, scaled) < 0.25 and rel_err(ts, refq) > 0.5


def test_rge_directions_change_every_step_and_are_reproducible():
    """The state is a value: the same state gives the same directions, the next state new ones."""
    model, x, y, loss_fn = PROBLEMS["mlp"]
    a = bbzo.create_estimator("rge", q=4, seed=3)
    g1, s1 = bbzo.estimate_grad(model, loss_fn, x, y, a, set_grad=False)
    g2, s2 = bbzo.estimate_grad(model, loss_fn, x, y, a, s1, set_grad=False)
    h1, _ = bbzo.estimate_grad(model, loss_fn, x, y, bbzo.create_estimator("rge", q=4, seed=3), set_grad=False)
    assert all(torch.equal(g1[k], h1[k]) for k in g1)
    assert not all(torch.equal(g1[k], g2[k]) for k in g1)
    assert (s1.step, s2.step) == (1, 2) and a.init({}).step == 0


#: Every registered estimator, in the settings its tests use (a new estimator must be added here).
ESTIMATORS = {
    "cge": lambda params: bbzo.create_estimator("cge", mu=1e-6),
    "cge-central": lambda params: bbzo.create_estimator("cge", mu=1e-5, difference="central"),
    "sparse_cge": lambda params: bbzo.create_estimator(
        "sparse_cge", coords={n: torch.arange(0, p.numel(), 3) for n, p in params.items()}, mu=1e-6),
    "sparse_cge-central": lambda params: bbzo.create_estimator(
        "sparse_cge", coords={n: torch.arange(0, p.numel(), 2) for n, p in params.items()}, difference="central", mu=1e-5),
    "rge": lambda params: bbzo.create_estimator("rge", q=5, mu=1e-6),
    "rge-central": lambda params: bbzo.create_estimator("rge", q=5, difference="central", mu=1e-6),
    "autograd": lambda params: bbzo.create_estimator("autograd"),
    "oracle_cge": lambda params: bbzo.create_estimator("oracle_cge", mu=1e-6, width=3),
    "oracle_cge-central": lambda params: bbzo.create_estimator("oracle_cge", mu=1e-4, difference="central", width=3),
    "oracle_rge": lambda params: bbzo.create_estimator("oracle_rge", q=4, mu=1e-6, width=3),
    "hybrid_cge": lambda params: bbzo.create_estimator(
        "hybrid_cge", coords={n: torch.arange(0, p.numel(), 3) for n, p in params.items()}, mu=1e-6),
}
#: How each is checked against the analytic gradient: "exact" (on the coordinates it estimates) or
#: "unbiased" (the mean of many draws, see the RGE tests above).
ANALYTIC = {"cge": ("exact", 1e-5), "sparse_cge": ("exact", 1e-5), "rge": ("unbiased", None), "autograd": ("exact", 1e-12),
            "oracle_cge": ("chain", 1e-5), "oracle_rge": ("chain-unbiased", None), "hybrid_cge": ("hybrid", 1e-5)}


def _half_surrogate(loss_fn):
    """``loss_fn`` as an objective whose stop-gradient surrogate has half its gradient (so the test can tell them apart)."""
    class Half(bbzo.Objective):
        needs_inputs = False

        def __call__(self, out, inputs, targets):
            return loss_fn(out, targets)

        def surrogate(self, out, inputs, targets):
            v = loss_fn(out, targets)
            return 0.5 * v + 0.5 * v.detach()  # same value, half the gradient

    return Half()


def test_every_registered_estimator_is_covered():
    assert {k.split("-")[0] for k in ESTIMATORS} == set(bbzo.list_estimators()) == set(ANALYTIC)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_registered_estimator_against_the_analytic_gradient(name):
    """f(w) = 0.5 (w - c)^T A (w - c): the gradient is A (w - c), known in closed form."""
    model, x, _, loss_fn = problems()["quadratic"]
    truth = {"w": (model.A @ (model.w - model.c)).detach()}
    params = {n: p.detach() for n, p in model.named_parameters()}
    kind, tol = ANALYTIC[name.split("-")[0]]
    if kind.startswith("chain"):  # the same quadratic, with the black box after the model: f(w) = oracle(model)
        lin = torch.nn.Linear(7, 3).double()  # model: w -> z = L w (3 outputs); oracle: 0.5 ||z - c||^2
        x7 = torch.zeros(5, 7, dtype=torch.float64)
        with torch.no_grad():
            lin.bias.zero_()
        c = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
        oracle = bbzo.FunctionOracle(lambda z: 0.5 * (z - c).pow(2).sum(1, keepdim=True), name="bowl")
        obj = bbzo.OracleObjective(oracle, lambda a, out, inp, t: a[:, 0], needs_inputs=False)
        xin = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + x7
        z = lin(xin)
        ref = torch.autograd.grad(0.5 * (z - c).pow(2).sum(1).mean(), list(lin.parameters()))
        truth = dict(zip([n for n, _ in lin.named_parameters()], ref))
        if kind == "chain":
            g = grad(lin, obj, xin, None, ESTIMATORS[name]({}), set_grad=False)
            assert rel_err(g, truth) <= tol, rel_err(g, truth)
        else:  # random directions in the oracle's input space: unbiased, the mean of many draws
            est = ESTIMATORS[name]({})
            adapter = make_adapter(lin)
            draws = 300
            mean, state = None, None
            for _ in range(draws):
                res = estimate(adapter, est, obj, xin, None, state=state)
                g, state = res.grads, res.state
                mean = g if mean is None else {k: mean[k] + g[k] for k in g}
            mean = {k: v / draws for k, v in mean.items()}
            assert rel_err(mean, truth) < 0.1 and not rel_err({k: 0.5 * v for k, v in mean.items()}, truth) < 0.1
        return
    if kind == "hybrid":  # finite differences on its coordinates, the surrogate (half the gradient) elsewhere
        est = ESTIMATORS[name](params)
        g = grad(model, _half_surrogate(loss_fn), x, None, est, set_grad=False)
        idx = est.inner.coords(params, est.init(params))["w"]
        mask = torch.zeros(7, dtype=torch.bool)
        mask[idx] = True
        scale = float(truth["w"].abs().max())
        assert float((g["w"][mask] - truth["w"][mask]).abs().max()) <= tol * scale
        assert float((g["w"][~mask] - 0.5 * truth["w"][~mask]).abs().max()) <= 1e-12 * scale
        return
    if kind == "exact":
        est = ESTIMATORS[name](params)
        g = grad(model, loss_fn, x, None, est, set_grad=False)
        if name.startswith("sparse_cge"):
            idx = est.coords(params, est.init(params))["w"]
            assert float((g["w"][idx] - truth["w"][idx]).abs().max()) <= tol * float(truth["w"].abs().max())
            mask = torch.ones(7, dtype=torch.bool)
            mask[idx] = False
            assert torch.equal(g["w"][mask], torch.zeros(int(mask.sum()), dtype=torch.float64))
        else:
            assert rel_err(g, truth) <= tol, rel_err(g, truth)
    else:
        draws, q = 400, 5
        mean = _rge_mean(model, x, None, loss_fn, draws, q=q,
                         difference="central" if name.endswith("central") else "forward")
        assert _within(mean, truth, 7, q, draws), _err(mean, truth)


@pytest.mark.parametrize("name", list(ESTIMATORS))
@pytest.mark.parametrize("feature_reuse", [False, "auto"])
def test_queries_counted_by_the_ledger_equal_the_declared_cost_and_the_oracle_sees_no_grad(name, feature_reuse):
    model = mlp64()
    params = dict(model.named_parameters())
    est = ESTIMATORS[name](params)
    oracle = SpyOracle(3, 2)
    ledger = QueryLedger()
    ledger.attach(oracle)
    x = torch.randn(8, 4, dtype=torch.float64)
    loss = lambda a, out, inp, t: a.pow(2).sum(1)  # noqa: E731
    # the stop-gradient surrogate (hybrid_cge): the same loss, the oracle's answer a constant
    loss_fn = bbzo.OracleObjective(oracle, loss, needs_inputs=False,
                                   surrogate=lambda out, inp, t: loss(oracle.query(out.detach()), out, inp, t))
    adapter = make_adapter(model, feature_reuse=feature_reuse, max_chunk=7)
    declared = est.query_cost({n: p.detach() for n, p in params.items()})
    if name == "autograd":  # a white-box reference: it must not get through a black box
        with pytest.raises(bbzo.OracleError, match="refuses inputs that require grad"):
            estimate(adapter, est, loss_fn, x, None, ledger=ledger)
        assert declared == 0 and ledger.queries == 0
        return
    res = estimate(adapter, est, loss_fn, x, None, ledger=ledger)
    assert res.queries == declared == ledger.queries
    assert oracle.rows_used == declared * 8 == ledger.rows(oracle)
    # chunked in calls of at most 7 sets, the base apart (the chain rule's output probes fit one call)
    assert oracle.calls_used == res.calls
    if name.startswith("oracle_"):
        assert res.calls == (1 if name == "oracle_cge-central" else 2)
    else:
        assert res.calls >= 2
    assert oracle.saw_requires_grad and not any(oracle.saw_requires_grad)
    d = sum(p.numel() for p in params.values())
    expected = {"cge": d + 1, "cge-central": 2 * d, "rge": 6, "rge-central": 10, "oracle_cge": 3 + 1,
                "oracle_cge-central": 2 * 3, "oracle_rge": 4 + 1, "hybrid_cge": len(range(0, 24, 3)) + len(range(0, 6, 3))
                + len(range(0, 18, 3)) + len(range(0, 3, 3)) + 1}
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
    assert {i.name for i in infos} == set(bbzo.list_estimators())
    assert all(n.endswith("cge") for n in bbzo.list_estimators("*cge")) and "cge" in bbzo.list_estimators("*cge")
    assert "autograd" not in bbzo.list_estimators(zeroth_order=True)
    assert bbzo.list_estimators(zeroth_order=False) == ["autograd"]


def test_sparse_coords_validation():
    model = mlp64()
    est = bbzo.create_estimator("sparse_cge", coords={"missing.weight": torch.tensor([0])})
    with pytest.raises(ConfigError, match="not trainable"):
        grad(model, lambda o, t: o.sum(1), torch.randn(2, 4, dtype=torch.float64), None, est)
    est = bbzo.create_estimator("sparse_cge", coords={"0.weight": torch.tensor([10_000])})
    with pytest.raises(bbzo.ShapeError, match=r"\[0, 24\)"):
        grad(model, lambda o, t: o.sum(1), torch.randn(2, 4, dtype=torch.float64), None, est)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grads_keep_dtype_shape_and_land_in_param_grad(dtype):
    model = mlp64().to(dtype)
    x = torch.randn(5, 4, dtype=dtype)
    g = grad(model, lambda o, t: o.pow(2).sum(1), x, None, bbzo.create_estimator("cge"))
    assert list(g) == [n for n, _ in model.named_parameters()]
    for n, p in model.named_parameters():
        assert g[n].dtype == dtype and g[n].shape == p.shape
        assert torch.equal(p.grad, g[n])


def test_frozen_parameters_are_not_estimated():
    model = mlp64()
    model[0].weight.requires_grad_(False)
    g = grad(model, lambda o, t: o.pow(2).sum(1), torch.randn(3, 4, dtype=torch.float64), None,
                           bbzo.create_estimator("cge"))
    assert "0.weight" not in g and "0.bias" in g


def test_transforms_compose_masked_and_clipped():
    from bbzo.estimators import chain, clip_by_global_norm, masked, scale

    model, x, y, loss_fn = PROBLEMS["mlp"]
    params = {n: p.detach() for n, p in model.named_parameters()}
    coords = {"0.weight": torch.tensor([0, 5, 7])}
    full = grad(model, loss_fn, x, y, bbzo.create_estimator("cge", mu=1e-6), set_grad=False)
    m = grad(model, loss_fn, x, y, masked(bbzo.create_estimator("cge", mu=1e-6), coords), set_grad=False)
    assert torch.equal(m["0.weight"].flatten()[[0, 5, 7]], full["0.weight"].flatten()[[0, 5, 7]])
    assert int((m["0.weight"] != 0).sum()) == 3 and all(float(m[n].abs().max()) == 0 for n in params if n != "0.weight")
    clipped = grad(model, loss_fn, x, y, chain(bbzo.create_estimator("cge", mu=1e-6), clip_by_global_norm(1e-3)),
                   set_grad=False)
    norm = float(torch.sqrt(sum((v ** 2).sum() for v in clipped.values())))
    assert norm == pytest.approx(1e-3, rel=1e-3)
    ratio = clipped["2.bias"] / full["2.bias"]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))  # a uniform scaling, direction kept
    with pytest.raises(ConfigError, match="coordinate-wise"):
        masked(bbzo.create_estimator("rge"), coords)
    # transforms apply in order, on a masked estimate too; the state is the inner estimator's
    est = chain(masked(bbzo.create_estimator("cge", mu=1e-6), coords), scale(-2.0), clip_by_global_norm(1e9))
    both, state = bbzo.estimate_grad(model, loss_fn, x, y, est, set_grad=False)
    assert torch.equal(both["0.weight"], -2.0 * m["0.weight"]) and state.step == 1 and "coords" in state._fields
