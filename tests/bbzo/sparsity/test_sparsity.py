"""Sparsity: scores, layer-wise ratios, the dynamic sampler and Sparse-CGE training with it."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

import bbzo
from bbzo.data import TensorBatches
from bbzo.errors import ConfigError
from bbzo.ledger import QueryLedger
from bbzo.sparsity import (DynamicSparsity, LayerRatios, compute_score, dynamic_sparse_cge, list_scores,
                           prunable_params, ratios_from_scores, sparse_cge_from_score, uniform_ratios)
from bbzo.trainer import Trainer


def ce(o, t):
    return F.cross_entropy(o, t, reduction="none")


def tiny_cnn(act=nn.ReLU):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), act(), nn.Conv2d(3, 4, 3, padding=1),
                         act(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def tiny_batch(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


# ---------------------------------------------------------------------------- LPR
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("keep", ["largest_abs", "largest", "smallest"])
def test_lpr_counts_sum_to_the_requested_sparsity(sparsity, keep):
    g = torch.Generator().manual_seed(0)
    scores = {f"l{i}.weight": torch.randn(s, generator=g) * (i + 1) for i, s in enumerate([7, 100, 333, 1000])}
    lpr = ratios_from_scores(scores, sparsity, keep)
    total = sum(t.numel() for t in scores.values())
    assert lpr.total_kept == round((1 - sparsity) * total)
    assert abs(lpr.total_kept - (1 - sparsity) * total) <= len(scores)
    # the counts are exactly those of a global ranking
    key = {"largest_abs": lambda t: t.abs(), "largest": lambda t: t, "smallest": lambda t: -t}[keep]
    thr = torch.sort(torch.cat([key(t) for t in scores.values()]), descending=True).values[lpr.total_kept - 1] \
        if lpr.total_kept else float("inf")
    for n, t in scores.items():
        assert lpr.kept[n] == int((key(t) >= thr).sum())
    uni = uniform_ratios(lpr.size, sparsity)
    assert all(abs(uni.kept[n] - (1 - sparsity) * s) <= 0.5 for n, s in lpr.size.items())


def test_lpr_json_round_trip_and_bad_files(tmp_path):
    lpr = ratios_from_scores({"a.weight": torch.arange(10.0), "b.weight": -torch.arange(30.0)}, 0.8,
                             model="m", score="s", seed=3, queries=42)
    path = lpr.save(tmp_path / "lpr.json")
    d = json.loads(path.read_text())
    # the 8 largest |scores| of 40 are b's 29..22: a keeps nothing
    assert d["kept"] == {"a.weight": 0, "b.weight": 8}
    assert d["kept_fraction"]["a.weight"] == 0.0 and d["kept_fraction"]["b.weight"] == pytest.approx(8 / 30, abs=1e-4)
    assert d["model"] == "m" and d["score"] == "s" and d["queries"] == 42 and d["sparsity"] == 0.8
    back = LayerRatios.load(path)
    assert back.kept == lpr.kept and back.size == lpr.size and back.queries == 42
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        LayerRatios.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"x": 1}')
    with pytest.raises(ConfigError, match="bbzo prune"):
        LayerRatios.load(tmp_path / "other.json")
    with pytest.raises(ConfigError, match="does not exist"):
        LayerRatios.load(tmp_path / "missing.json")


# ---------------------------------------------------------------------------- sampler
def _lpr_for(model, sparsity=0.7):
    names = prunable_params(model)
    params = dict(model.named_parameters())
    return ratios_from_scores({n: torch.rand(params[n].shape, generator=torch.Generator().manual_seed(i))
                               for i, n in enumerate(names)}, sparsity)


def test_sampler_draws_exact_counts_reproducibly_and_redraws():
    model = tiny_cnn()
    params = {n: p.detach() for n, p in model.named_parameters()}
    lpr = _lpr_for(model)
    s = DynamicSparsity(lpr, params, resample_every=5, seed=11)
    c0, c0b = s.coords_at(0), s.coords_at(4)
    for n, k in lpr.kept.items():
        assert c0[n].numel() == k and torch.unique(c0[n]).numel() == k
        assert int(c0[n].min()) >= 0 and int(c0[n].max()) < params[n].numel()
        assert torch.equal(c0[n], c0b[n])  # same draw inside a period
    c1 = s.coords_at(5)
    assert any(not torch.equal(c0[n], c1[n]) for n in lpr.kept if 0 < lpr.kept[n] < lpr.size[n])
    again = DynamicSparsity(lpr, params, resample_every=5, seed=11).coords_at(7)
    assert all(torch.equal(again[n], c1[n]) for n in c1)
    other = DynamicSparsity(lpr, params, resample_every=5, seed=12).coords_at(0)
    assert any(not torch.equal(other[n], c0[n]) for n in lpr.kept if 0 < lpr.kept[n] < lpr.size[n])
    # non-LPR tensors: dense / sparse / frozen
    bias_names = [n for n in params if n not in lpr.kept]
    assert all(c0[n].numel() == params[n].numel() for n in bias_names)
    sp = DynamicSparsity(lpr, params, seed=11, others="sparse").coords_at(0)
    assert all(sp[n].numel() == round(0.3 * params[n].numel()) for n in bias_names)
    fr = DynamicSparsity(lpr, params, seed=11, others="frozen").coords_at(0)
    assert not any(n in fr for n in bias_names)
    assert DynamicSparsity(lpr, params, resample_every=0).draw_index(10**6) == 0


def test_sampler_rejects_an_lpr_of_another_model():
    lpr = _lpr_for(tiny_cnn())
    other = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ConfigError, match="bbzo prune"):
        DynamicSparsity(lpr, {n: p for n, p in other.named_parameters()})


def _sparse_trainer(tmp_path, steps, run_dir):
    model = tiny_cnn()
    x, y = tiny_batch(64)
    params = {n: p.detach() for n, p in model.named_parameters()}
    est = dynamic_sparse_cge(_lpr_for(model, 0.8), params, mu=1e-3, resample_every=3, seed=5)  # DeepZero's recipe
    sampler = est.schedule
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tr = Trainer(model, ce, est, opt, TensorBatches(x, y, 16, seed=0), max_steps=steps, run_dir=run_dir,
                 checkpoint_every=1)
    return tr, sampler, model


def test_trainer_uses_the_draw_of_each_step_and_resumes_exactly(tmp_path):
    tr, sampler, model = _sparse_trainer(tmp_path, 8, tmp_path / "a")
    seen = []
    tr.after_step.append(lambda t, s: seen.append((s["sparsity_draw"], s["queries"])))
    first_loss = tr.step()["loss"]
    tr.run()
    assert [d for d, _ in seen] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert all(q == sampler.coords_per_step + 1 for _, q in seen)
    # only the drawn coordinates of the LPR tensors got a gradient on the last step
    last = sampler.coords_at(7)
    for n, p in model.named_parameters():
        nz = torch.nonzero(p.grad.flatten()).flatten()
        assert set(nz.tolist()) <= set(last[n].tolist())
    assert tr.status["loss"] < first_loss
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    # interrupted after 4 steps, resumed in a new process-like trainer: identical weights
    tr2, _, _ = _sparse_trainer(tmp_path, 8, tmp_path / "b")
    tr2.run(4)
    tr3, _, model3 = _sparse_trainer(tmp_path, 8, tmp_path / "b")
    tr3.resume()
    assert tr3.step_count == 4
    tr3.run()
    for n, p in model3.named_parameters():
        assert torch.equal(p.detach(), final[n]), n


def test_the_recipe_scores_once_caches_the_lpr_and_draws_its_counts(tmp_path):
    """sparse_cge_from_score: score -> lpr.json -> dynamic Sparse-CGE; a resumed run reads the file, never rescoring."""
    model = tiny_cnn()
    x, y = tiny_batch()
    ledger = QueryLedger()
    est, lpr = sparse_cge_from_score("zo_grasp", model, ce, x, y, sparsity=0.8, seed=1, ledger=ledger, mu=1e-3,
                                     resample_every=2, score_options={"q": 4, "mu": 5e-3, "not_an_option": 1},
                                     cache=tmp_path / "lpr.json")
    assert (tmp_path / "lpr.json").exists() and lpr.queries == ledger.queries == 2 * (4 + 1)
    params = {n: p.detach() for n, p in model.named_parameters()}
    coords = est.coords(params, est.init(params))
    for n, k in lpr.kept.items():
        assert coords[n].numel() == k  # exactly the LPR's count per scored tensor
    again, lpr2 = sparse_cge_from_score("zo_grasp", model, ce, x, y, sparsity=0.8, seed=1, ledger=ledger,
                                        cache=tmp_path / "lpr.json", reuse=True)
    assert lpr2.kept == lpr.kept and ledger.queries == 10  # read back: no new query
    dense = dynamic_sparse_cge(uniform_ratios({n: p.numel() for n, p in params.items()}, 0.0), params)
    assert dense.info.name == "cge"  # a plan that keeps every coordinate is plain CGE
    hyb = dynamic_sparse_cge(lpr, params, surrogate=True)
    assert hyb.info.name == "hybrid_cge" and hyb.query_cost(params) == est.query_cost(params)


# ---------------------------------------------------------------------------- scores
def test_every_score_is_registered_and_leaves_the_model_alone():
    assert {"zo_grasp", "zo_grasp_sketch", "zo_grasp_oracle", "fo_grasp", "snip", "magnitude", "random",
            "layer_noise"} <= set(list_scores())
    model = tiny_cnn()
    x, y = tiny_batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name in list_scores():
        kw = {"q": 4} if name in ("zo_grasp", "zo_grasp_sketch") else {}
        res = compute_score(name, model, ce, x, y, **kw)
        assert set(res.scores) == set(prunable_params(model))
        assert all(torch.isfinite(s).all() for s in res.scores.values()), name
        assert all(s.shape == dict(model.named_parameters())[n].shape for n, s in res.scores.items())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fo_grasp_matches_a_hand_computed_hessian_gradient_product():
    # y = w2 * tanh(w1 * x), loss = 0.5 (y - t)^2 averaged over samples; g and H by hand
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Tanh(), nn.Linear(1, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.fill_(0.7)
        model[2].weight.fill_(-1.3)
    x = torch.tensor([[0.5], [-1.0], [2.0]], dtype=torch.float64)
    t = torch.tensor([[0.3], [0.1], [-0.4]], dtype=torch.float64)
    w1, w2 = 0.7, -1.3
    a = w1 * x.flatten()
    h = torch.tanh(a)
    r = w2 * h - t.flatten()
    s = 1 - h ** 2
    g1, g2 = (r * w2 * s * x.flatten()).mean(), (r * h).mean()
    h11 = ((w2 * s * x.flatten()) ** 2 + r * w2 * (-2 * h * s) * x.flatten() ** 2).mean()
    h12 = (h * w2 * s * x.flatten() + r * s * x.flatten()).mean()
    h22 = (h ** 2).mean()
    hg = torch.stack([h11 * g1 + h12 * g2, h12 * g1 + h22 * g2])
    expect = -torch.tensor([w1, w2], dtype=torch.float64) * hg
    res = compute_score("fo_grasp", model, lambda o, tt: 0.5 * ((o - tt) ** 2).flatten(), x, t)
    got = torch.stack([res.scores["0.weight"].flatten()[0], res.scores["2.weight"].flatten()[0]])
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)
    # temperature divides the outputs: T=1 vs T=2 differ, and signed ranking is "smallest"
    res2 = compute_score("fo_grasp", model, lambda o, tt: 0.5 * ((o - tt) ** 2).flatten(), x, t,
                         temperature=2.0, signed=True)
    assert res2.keep == "smallest" and not torch.allclose(res2.scores["0.weight"], res.scores["0.weight"])


def _mean_spearman(a, b):
    return float(np.mean([spearmanr(a[n].flatten(), b[n].flatten()).correlation for n in a]))


def test_improved_query_only_score_converges_to_fo_grasp_as_queries_grow():
    model = tiny_cnn(act=nn.Tanh).double()
    x, y = tiny_batch()
    x = x.double()
    fo = compute_score("fo_grasp", model, ce, x, y)
    cos = []
    for q in (2, 32, 1024):
        res = compute_score("zo_grasp_sketch", model, ce, x, y, q=q, readout="coords", eps=1e-4, delta=1e-4)
        d = sum(p.numel() for p in fo.scores.values())
        assert res.queries == 2 * q + 2 + 2 * d
        a = torch.cat([res.scores[n].flatten() for n in fo.scores])
        b = torch.cat([fo.scores[n].flatten() for n in fo.scores])
        cos.append(float(a @ b / (a.norm() * b.norm())))
    assert cos[0] < cos[1] < cos[2] and cos[2] > 0.98, cos
    # the rank-1 read-out keeps much of the within-layer ranking; uniform noise keeps none of it
    cp = compute_score("zo_grasp_sketch", model, ce, x, y, q=1024, readout="cp", eps=1e-4, delta=1e-4)
    assert _mean_spearman(cp.scores, fo.scores) > 0.5
    assert abs(_mean_spearman(compute_score("layer_noise", model, ce, x, y).scores, fo.scores)) < 0.2


def test_oracle_score_equals_fo_grasp_with_6c_queries():
    model = tiny_cnn()
    x, y = tiny_batch()
    fo = compute_score("fo_grasp", model.double(), ce, x.double(), y)
    model.float()
    res = compute_score("zo_grasp_oracle", model, ce, x, y)
    assert res.queries == 6 * 3
    for n in fo.scores:
        torch.testing.assert_close(res.scores[n], fo.scores[n], rtol=1e-4, atol=1e-9)
    # a flat loss has g = 0, hence Jg = 0: the Hessian read-out is skipped and only 2C queries are made (and reported)
    flat = compute_score("zo_grasp_oracle", model, lambda o, t: 0.0 * o.sum(1), x, y)
    assert flat.queries == 2 * 3 and all(float(v.abs().max()) == 0 for v in flat.scores.values())


def test_reference_zo_grasp_costs_2q_plus_2_and_is_seeded():
    model = tiny_cnn()
    x, y = tiny_batch()
    a = compute_score("zo_grasp", model, ce, x, y, q=8, seed=3)
    b = compute_score("zo_grasp", model, ce, x, y, q=8, seed=3)
    c = compute_score("zo_grasp", model, ce, x, y, q=8, seed=4)
    assert a.queries == 2 * (8 + 1) and a.keep == "largest_abs"
    assert all(torch.equal(a.scores[n], b.scores[n]) for n in a.scores)
    assert not all(torch.equal(a.scores[n], c.scores[n]) for n in a.scores)


def test_layer_noise_is_theta_times_noise_over_sqrt_size():
    model = tiny_cnn()
    res = compute_score("layer_noise", model, seed=0)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)  # the documented draw, in the documented order
    for n, s in res.scores.items():
        t = params[n].detach().double()
        expect = t * torch.randn(t.shape, generator=g, dtype=torch.float64) / t.numel() ** 0.5
        torch.testing.assert_close(s, expect, rtol=1e-12, atol=0)


def test_data_scores_need_data_and_unknown_options_are_refused():
    with pytest.raises(ConfigError, match="needs data"):
        compute_score("fo_grasp", tiny_cnn())
    with pytest.raises(ConfigError, match="unknown score"):
        compute_score("grasp2", tiny_cnn())
    x, y = tiny_batch()
    with pytest.raises(ConfigError, match="takes no option 'qq'; its options: q=192, mu=0.005"):
        compute_score("zo_grasp", tiny_cnn(), ce, x, y, qq=4)  # a misspelled option is never swallowed
    with pytest.raises(ConfigError, match="takes no option 'q'"):
        compute_score("magnitude", tiny_cnn(), q=4)


#: The cost each registered score declares, as a function of (q, C = outputs per sample, d = scored coordinates,
#: cp = sum over layers of O + C + k + 1 read-outs); a newly registered score must be added here.
DECLARED = {
    "magnitude": lambda q, c, d, cp: 0, "random": lambda q, c, d, cp: 0, "layer_noise": lambda q, c, d, cp: 0,
    "fo_grasp": lambda q, c, d, cp: 0, "snip": lambda q, c, d, cp: 0,
    "zo_grasp": lambda q, c, d, cp: 2 * (q + 1),
    "zo_grasp_oracle": lambda q, c, d, cp: 6 * c,
    "zo_grasp_sketch": lambda q, c, d, cp: 2 * q + 2 + 2 * cp,
}


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_every_score_makes_exactly_the_queries_it_declares(name):
    from bbzo.ledger import QueryLedger
    from bbzo.sparsity import score_accepts

    assert set(DECLARED) == set(list_scores())
    model = tiny_cnn()
    x, y = tiny_batch()
    ledger = QueryLedger()
    kw = {"q": 4} if score_accepts(name, "q") else {}
    res = compute_score(name, model, ce, x, y, ledger=ledger, **kw)
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in prunable_params(model)]
    cp = sum(s[0] + s[1] + (int(torch.Size(s[2:]).numel()) if len(s) > 2 else 1) + 1 for s in shapes)
    cp -= sum(1 for s in shapes if len(s) == 2)  # a Linear weight has no kernel mode to read
    d = sum(int(torch.Size(s).numel()) for s in shapes)
    assert res.queries == ledger.queries == DECLARED[name](kw.get("q", 0), 3, d, cp)
