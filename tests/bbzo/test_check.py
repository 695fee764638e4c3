"""bbzo.check: every measurement on toy oracles with known answers.

A deterministic quadratic (its derivative is known, its noise is round-off), one with injected noise of known
size (with and without a seed), one that fails on a known region, a model in front of an oracle and one inside a
loop with it (autograd through a white-box twin of the oracle gives the true gradient to compare with).
"""

import json
import math
import time

import numpy as np
import pytest
import torch
from torch import nn

import bbzo
from bbzo.check import (OutputSpace, ParameterSpace, RolloutSpace, RowSpace, Subject, analyse_sweep, check, cost,
                        determinism, ecnoise, format_report, input_range, mu_grid, noise_floor, plot_report, step_sweep,
                        write_json)
from bbzo.oracle import FunctionOracle


def first_answer(answers, index):
    return answers[:, 0]


def rows(n=6, d=3, dtype=torch.float64, seed=0):
    return (torch.rand(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1).to(dtype)


def quadratic():
    return FunctionOracle(lambda x: (x ** 2).sum(1, keepdim=True), name="quadratic")


def noisy(sigma, seeded=False):
    """sum(x^2) + sigma * N(0, 1): fresh noise per row, or (seeded) one draw from the seed for every row."""
    fresh = torch.Generator().manual_seed(99)

    def fn(x, seed=None):
        if seed is not None:
            e = torch.randn(1, 1, generator=torch.Generator().manual_seed(seed), dtype=x.dtype).expand(x.shape[0], 1)
        else:
            e = torch.randn(x.shape[0], 1, generator=fresh, dtype=x.dtype)
        return (x ** 2).sum(1, keepdim=True) + sigma * e

    if seeded:
        return FunctionOracle(fn, name="noisy-seeded")
    return FunctionOracle(lambda x: fn(x), name="noisy")


# ---------------------------------------------------------------------------- the numerics
def test_ecnoise_measures_injected_noise_and_says_when_the_spacing_is_wrong():
    t = np.arange(9) * 1e-3
    found = []
    for s in range(30):
        f = 1 + 0.1 * t + 1e-6 * np.random.default_rng(s).standard_normal(9)
        level, inform = ecnoise(f)
        assert inform == 1
        found.append(level)
    assert 0.75e-6 < np.median(found) < 1.25e-6  # the standard deviation of the injected noise
    level, inform = ecnoise((1 + t ** 2).astype(np.float32).astype(np.float64))
    assert inform == 1 and level < 2e-7  # float32 round-off: a fraction of an ulp (1.2e-7) at 1
    assert ecnoise(np.ones(9))[1] == 2  # flat: move the points farther apart
    assert ecnoise(1 + 10 * t * 100)[1] == 3  # varies by more than 10%: move them closer


def test_the_sweep_of_a_float32_quadratic_finds_its_derivative_and_the_sides_of_the_v():
    mus = mu_grid(1e-8, 1e-1, 2, include=[1e-7])
    x = np.float32(1.0)
    f = lambda h: np.float64(np.float32(x + np.float32(h)) ** 2)  # noqa: E731 -- f(x) = x^2 in float32
    fwd = np.array([[[(f(h) - f(0)) / h] for h in mus]])
    cen = np.array([[[(f(h) - f(-h)) / (2 * h)] for h in mus]])
    eps = float(np.finfo(np.float32).eps)
    res = analyse_sweep(mus, fwd, cen, eps, configured=1e-7)
    assert abs(res["reference"][0][0] - 2.0) < 1e-3
    assert 1e-4 <= res["recommended_mu"] <= 1e-2 and res["min_error"] < 1e-3  # sqrt(eps)-ish for forward differences
    assert res["configured"]["side"] == "round-off" and res["configured"]["error"] > 0.1
    assert analyse_sweep(mus, fwd, cen, eps, configured=0.1)["configured"]["side"] == "truncation"
    err = dict(zip(mus, res["forward_error"]))
    assert err[0.1] == pytest.approx(0.05, rel=0.01)  # truncation of a forward difference: f'' h / (2 f') = h / 2


# ---------------------------------------------------------------------------- determinism and noise
def test_a_deterministic_quadratic_is_deterministic_and_its_noise_is_round_off():
    x = rows(dtype=torch.float32)
    o = quadratic()
    sub = Subject(o, x, spaces=[RowSpace(o, x, loss=first_answer)])
    det = determinism(sub)
    assert det["deterministic"] and det["repeat_max_diff"] == 0 and not det["accepts_seed"] and "seeded" not in det
    n = noise_floor(sub.spaces[0], [0, 1, 2], repeats=4)
    assert n["sampling_sd"] == 0
    ulp = float(np.finfo(np.float32).eps) * n["loss"]
    assert 0 < n["roundoff"] < 4 * ulp and n["loss_dtype"] == "float32"


def test_injected_noise_of_known_size_is_found_and_a_seed_removes_it():
    sigma = 1e-3
    x = rows(8)
    o = noisy(sigma)
    sub = Subject(o, x, spaces=[RowSpace(o, x, loss=first_answer)])
    det = determinism(sub)
    assert not det["deterministic"] and det["repeat_max_diff"] > sigma and not det["accepts_seed"]
    n = noise_floor(sub.spaces[0], [0, 1], repeats=25)
    assert 0.7 * sigma < n["sampling_sd"] < 1.3 * sigma  # median over the rows of each row's sd over 25 calls
    assert n["noise"] >= n["sampling_sd"]
    seeded = noisy(sigma, seeded=True)
    sub = Subject(seeded, x, spaces=[RowSpace(seeded, x, loss=first_answer, mu=1e-3)])
    det = determinism(sub)
    assert det["accepts_seed"] and det["seeded"]["deterministic"] and det["seed_effect_max_diff"] > sigma / 10
    plain = step_sweep(sub.spaces[0], [0, 1, 2], [1e-4, 1e-3, 1e-2], sigma)
    crn = step_sweep(sub.spaces[0], [0, 1, 2], [1e-4, 1e-3, 1e-2], 1e-15, seed=7)
    assert crn["configured"]["error"] < 1e-2 < 0.1 < plain["configured"]["error"]
    rep = check(sub, coords=3, mus=[1e-4, 1e-3, 1e-2], repeats=4, explore=0, progress=False,
                sections=("determinism", "noise", "step"))
    assert "crn" in rep["step"]["oracle inputs"] and "crn" in rep["noise"]["oracle inputs"]
    assert rep["noise"]["oracle inputs"]["crn"]["sampling_sd"] == 0
    texts = " ".join(f["text"] for f in rep["findings"])
    assert "common random numbers" in texts and "without common random numbers" in texts


def test_a_noisy_oracle_without_a_seed_is_told_to_take_one():
    x = rows(8)
    o = noisy(1e-2)
    rep = check(Subject(o, x, spaces=[RowSpace(o, x, loss=first_answer, mu=1e-3)]), coords=2, repeats=3, explore=0,
                progress=False, sections=("determinism", "noise", "step"))
    det = [f for f in rep["findings"] if f["topic"] == "determinism"][0]
    assert det["level"] == "warn" and "takes no seed" in det["text"]
    sweep = rep["step"]["oracle inputs"]["plain"]
    assert sweep["configured"]["side"] == "round-off" and sweep["configured"]["error"] > 1  # noise / mu swamps mu = 1e-3
    step = [f for f in rep["findings"] if f["topic"].startswith("step")][0]
    assert step["level"] == "warn"


# ---------------------------------------------------------------------------- the step against autograd
def _white_box(x):
    return torch.tanh(x) * torch.tensor([1.0, 2.0], dtype=x.dtype)


def test_parameter_and_output_references_match_autograd_through_a_white_box_twin():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    xb, yb = rows(5), rows(5, 2, seed=1)
    o = FunctionOracle(_white_box, name="tanh")
    obj = bbzo.OracleObjective(o, lambda a, out, inp, t: (a - t).pow(2).sum(1), needs_inputs=False)
    pspace = ParameterSpace(model, obj, xb, yb, mu=1e-4, needs_inputs=False)
    with torch.no_grad():
        out = model(xb)
    ospace = OutputSpace(out, obj, xb, yb, needs_inputs=False)
    # the true gradients, by autograd through the white-box twin of the oracle
    loss = (_white_box(model(xb)) - yb).pow(2).sum(1).mean()
    g = torch.cat([p.reshape(-1) for p in torch.autograd.grad(loss, list(model.parameters()))]).numpy()
    z = out.clone().requires_grad_(True)
    gz = torch.autograd.grad((_white_box(z) - yb).pow(2).sum(1).sum(), z)[0].numpy()  # (B, 2) per-sample
    coords = list(range(pspace.size))
    res = step_sweep(pspace, coords, mu_grid(1e-9, 1e-2, 2), 1e-16)
    np.testing.assert_allclose(np.array(res["reference"])[:, 0], g[coords], rtol=1e-6, atol=1e-9)
    assert res["labels"][0] == "weight[0, 0]" and res["configured"]["side"] == "good"
    res = step_sweep(ospace, [0, 1], mu_grid(1e-9, 1e-2, 2), 1e-16)
    np.testing.assert_allclose(np.array(res["reference"]), gz.T, rtol=1e-6, atol=1e-9)
    moved = pspace.evaluate([0, 4], [0.0, 0.5])[:, 0]
    with torch.no_grad():
        model.weight.view(-1)[4] += 0.5
        manual = obj(model(xb), None, yb).mean()
    assert moved[0] == pytest.approx(float(loss.detach()), rel=1e-12) and moved[1] == pytest.approx(float(manual), rel=1e-12)


def test_a_model_inside_a_loop_is_swept_through_the_rollout():
    torch.manual_seed(0)
    model = nn.Linear(2, 2).double()
    calls = []

    def step(s):
        calls.append(s.shape[0])
        return 0.9 * s

    o = FunctionOracle(step, name="loop")

    def rollout(model_fn, inputs, targets):
        s = inputs
        for _ in range(3):
            s = o.query(s) if not s.requires_grad else 0.9 * s
            s = s + model_fn(s)
        return (s - targets).pow(2).sum(1)

    x, y = rows(4, 2), rows(4, 2, seed=2)
    space = RolloutSpace(model, rollout, x, y, mu=1e-5)
    loss = rollout(model, x, y).mean()
    g = torch.cat([p.reshape(-1) for p in torch.autograd.grad(loss, list(model.parameters()))]).numpy()
    calls.clear()
    res = step_sweep(space, list(range(6)), [1e-7, 1e-6, 1e-5, 1e-4], 1e-16)
    np.testing.assert_allclose(np.array(res["reference"])[:, 0], g, rtol=1e-5, atol=1e-9)
    assert calls == [4] * 3 + [(1 + 2 * 6 * 4) * 4] * 3  # the base alone, then every perturbed model in one call per step


# ---------------------------------------------------------------------------- input range
def test_the_rows_of_a_known_failing_region_are_found_with_their_inputs():
    seen_bad: set = set()

    def sim(x):
        y = (x ** 2).sum(1, keepdim=True)
        bad = x[:, 0] > 0.5
        seen_bad.update(tuple(r) for r in x[bad].tolist())
        return torch.where(bad[:, None], torch.full_like(y, float("nan")), y)

    x = rows(16)
    x[:, 0] = x[:, 0].clamp(max=0.4)  # the current rows are all fine
    o = FunctionOracle(sim, name="fails where x0 > 0.5")
    res = input_range(Subject(o, x), per_scale=64, box=(-1.0, 1.0), seed=3)
    assert res["groups"][0]["failed"] == 0 and res["failed"] == len(seen_bad) > 10
    assert all(ex["input"][0] > 0.5 and ex["reason"].startswith("NaN") for ex in res["examples"])
    rule = [r for r in res["rules"] if r.startswith("x[0] >")]
    assert rule and abs(float(rule[0].split(">")[1]) - 0.5) < 0.1
    assert not o.allow_nonfinite  # restored


def test_a_call_that_raises_is_bisected_to_its_rows():
    def sim(x):
        if (x[:, 1] < -0.8).any():
            raise ValueError("pressure solve diverged")
        return x[:, :1]

    o = FunctionOracle(sim, name="raises where x1 < -0.8")
    x = rows(8).clamp(min=-0.5)
    res = input_range(Subject(o, x), scales=(), per_scale=40, box=(-1.0, 1.0), seed=0, max_bisect=400)
    u = res["groups"][1]
    assert u["failed"] > 0 and res["groups"][0]["failed"] == 0
    assert all(ex["input"][1] < -0.8 and "ValueError" in ex["reason"] for ex in res["examples"])
    g = torch.Generator().manual_seed(0)  # the same draws as input_range: count the failing rows independently
    torch.randint(0, 8, (40,), generator=g)
    box = -1 + 2 * torch.rand((40, 3), generator=g, dtype=torch.float64)
    assert u["failed"] == int((box[:, 1] < -0.8).sum())


# ---------------------------------------------------------------------------- cost
def test_cost_sees_a_fixed_overhead_per_call_and_measures_copies():
    def slow(x):
        time.sleep(0.004)  # a fixed cost per call: batching pays
        return x[:, :1]

    o = FunctionOracle(slow, name="slow")
    x = rows(4)
    spawned = []

    def spawn(k):
        spawned.append(k)
        return FunctionOracle(slow, name=f"slow x{k}")

    res = cost(Subject(o, x, spawn=spawn), [1, 16, 256], copies=2)
    assert res["latency_s"] >= 0.004
    rate = {c["rows"]: c["rows_per_s"] for c in res["curve"]}
    assert rate[256] > 20 * rate[1] and res["saturates_at"] == 256
    assert spawned == [2] and res["copies"]["rows"] == 256 and res["copies"]["speedup"] > 0
    res = cost(Subject(o, x, spawn=spawn, copies=3), [1, 16], copies=2)  # it already runs 3: compared with 1
    assert spawned == [2, 1] and res["copies"]["copies"] == 3


# ---------------------------------------------------------------------------- the whole check and its outputs
def test_check_writes_strict_json_a_table_and_a_plot(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    xb, yb = rows(8, dtype=torch.float32), rows(8, 2, dtype=torch.float32, seed=1)
    o = FunctionOracle(lambda z: np.tanh(z), numpy=True, name="tanh")
    obj = bbzo.OracleObjective(o, lambda a, out, inp, t: (a - t).pow(2).sum(1), needs_inputs=False)
    with torch.no_grad():
        out = model(xb)
    sub = Subject(o, out, spaces=[ParameterSpace(model, obj, xb, yb, mu=1e-9, needs_inputs=False),
                                  OutputSpace(out, obj, xb, yb, needs_inputs=False)],
                  label="toy", estimators=[("cge", 9, ""), ("oracle_cge", 3, "")])
    rep = check(sub, coords=4, repeats=3, explore=8, sizes=[1, 16, 64], progress=False)
    step = [f for f in rep["findings"] if f["topic"] == "step (parameters)"][0]
    assert step["level"] == "warn" and "round-off side" in step["text"]  # mu 1e-9 in float32
    assert rep["estimators"][1]["queries"] == 3 and rep["estimators"][1]["oracle_s"] > 0
    path = write_json(rep, tmp_path / "check.json")
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert set(data) >= {"determinism", "noise", "step", "cost", "input_range", "findings", "estimators"}
    text = format_report(rep)
    for key in ("determinism", "step (parameters)", "rows/s by call size", "queries per step", "input range", "!!"):
        assert key in text
    png = plot_report(rep, tmp_path / "check.png")
    assert png.exists() and png.stat().st_size > 10_000
    assert math.isfinite(data["step"]["parameters"]["plain"]["recommended_mu"])
