"""ZO-SOL end to end on a tiny grid: data cache, ZO steps lower the loss, ZO matches FO, NOG's stopped gradient,
exact resume, CLI."""

import json

import pytest
import torch
from click.testing import CliRunner

import bbzo
from bbzo.adapters import LoopAdapter
from bbzo.cli.main import main
from bbzo.config import resolve
from bbzo.errors import ConfigError
from bbzo.oracles.karman import KarmanOracle, KarmanSolver, phi
from bbzo.run import run_task
from bbzo.tasks.sol import TASK, SolSettings, features, make_corrector, make_rollout, nog_rollout
from bbzo.tasks.sol.data import DataSettings, RolloutBatches, generate, load
from bbzo.step import estimate

SMALL = dict(nx=16, ny=32, factor=2, train_re=(195.3, 3125.0), test_re=(781.3,), warmup=30, frames=10,
             corrector="tiny", unroll=2, batch=2, steps=8, lr=1e-3, sparsity=0.9, score_q=4, sets_per_call=8,
             non_steps=20, eval_steps=6, checkpoint_every=2, init="scratch", schedule="constant", no_progress=True, no_plots=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sol-data")


def cfg(data_dir, **kw):
    s, _ = resolve(SolSettings, {**SMALL, "data_dir": data_dir, **kw})
    return s


@pytest.fixture(scope="module")
def data(data_dir):
    torch.set_num_threads(1)
    return generate(cfg(data_dir).data, data_dir, progress=False)


def train(s, method):
    return run_task(TASK, s, trainings=[method], evaluate=False)["trainings"][method]


def test_data_is_cached_keyed_and_checked(data, data_dir):
    settings = cfg(data_dir).data
    assert data.train.shape == (2, 10, 2, 32, 16) and data.test.shape == (1, 10, 2, 32, 16)
    assert torch.isfinite(data.train).all() and data.train.abs().max() > 0.5
    npz = next(data_dir.glob("karman_*.npz"))
    mtime = npz.stat().st_mtime_ns
    again = generate(settings, data_dir, progress=False)  # cached: not regenerated
    assert npz.stat().st_mtime_ns == mtime and torch.equal(again.train, data.train)
    other = DataSettings(**{**settings.__dict__, "frames": 11})
    assert other.key() != settings.key()
    with pytest.raises(ConfigError, match="bbzo sol generate"):
        load(other, data_dir)
    bad_dir = data_dir / "corrupt"
    bad_dir.mkdir()
    (bad_dir / npz.name).write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="unreadable"):
        load(settings, bad_dir)


def test_rollout_batches_are_windows_of_the_reference(data):
    b = RolloutBatches(data.train, data.train_re, unroll=3, batch=4, seed=1)
    (x, re), y = b.get_batch(5)
    (x2, re2), y2 = RolloutBatches(data.train, data.train_re, unroll=3, batch=4, seed=1).get_batch(5)
    assert torch.equal(x, x2) and torch.equal(y, y2) and y.shape == (4, 3, 2, 32, 16)
    for i in range(4):  # targets are the frames that follow the start frame of the same simulation
        sim = int((data.train_re == re[i]).nonzero()[0])
        t = int(next(t for t in range(10) if torch.equal(data.train[sim, t], x[i])))
        assert torch.equal(y[i], data.train[sim, t + 1:t + 4])


def test_zo_gradient_through_phiflow_matches_fo_sol_at_the_shipped_setting(data, data_dir):
    """Sparse-CGE through the query-only oracle, forward differences at the shipped mu = 1e-4, vs autograd."""
    c = cfg(data_dir)
    assert c.mu == 1e-4  # the default every preset uses
    model = make_corrector(c, data)
    with torch.no_grad():  # a non-zero last layer so every layer has a gradient
        model.net[-1].weight.normal_(0, 0.02)
    batches = RolloutBatches(data.train, data.train_re, c.unroll, 2, seed=0)
    inputs, y = batches.get_batch(0)
    std = data.velocity_std()
    fo_rollout = make_rollout(KarmanSolver(c.data.low, backend="torch", jit=False).step, std)
    loss = fo_rollout(model, inputs, y).mean()
    with phi().TORCH:
        fo = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    coords = {"net.4.weight": torch.arange(0, 400, 7), "net.2.weight": torch.arange(0, 1600, 23), "net.4.bias": torch.arange(2)}
    est = bbzo.create_estimator("sparse_cge", coords=coords, mu=c.mu)  # forward differences, as ZO-SOL trains
    oracle = KarmanOracle(c.data.low, backend="torch")
    zo = estimate(LoopAdapter(model, sets_per_call=16), est, make_rollout(oracle.query, std), inputs, y)
    a = torch.cat([zo.grads[n].flatten()[i] for n, i in coords.items()]).double()
    b = torch.cat([fo[n].flatten()[i] for n, i in coords.items()]).double()
    cos = float(a @ b / (a.norm() * b.norm()))
    assert cos > 0.99, cos
    assert oracle.rows_used == zo.queries * 2 * c.unroll


def _grads(model, loss):
    names = [n for n, _ in model.named_parameters()]
    return dict(zip(names, torch.autograd.grad(loss, list(model.parameters()))))


def _flat(g):
    return torch.cat([v.flatten() for v in g.values()]).double()


def test_nog_gradient_is_the_stopped_gradient_of_the_rollout_not_fo_sols(data, data_dir):
    """NOG = autograd of the rollout whose solver outputs are constants: by bbzo's autograd estimator through the
    query-only oracle, by hand from the rollout's states, and through the differentiable solver detached; it is
    not FO-SOL's full gradient, and its loss value is ZO-SOL's."""
    c = cfg(data_dir, unroll=3)
    model = make_corrector(c, data)
    with torch.no_grad():  # a non-zero last layer: corrections change later solver inputs
        model.net[-1].weight.normal_(0, 0.05)
    inputs, y = RolloutBatches(data.train, data.train_re, c.unroll, 2, seed=0).get_batch(0)
    std = data.velocity_std()
    oracle = KarmanOracle(c.data.low, backend="torch")
    est = estimate(LoopAdapter(model), bbzo.create_estimator("autograd"), nog_rollout(oracle.query, std),
                        inputs, y)
    assert est.queries == 0 and oracle.rows_used == 2 * c.unroll  # the rollout itself, nothing more
    nog = _flat(est.grads)
    # by hand: run the rollout without a graph, keep each solver output P(s_t), then differentiate
    # sum_t |P(s_t) + C(P(s_t)) - y_t|^2 with every P(s_t) a constant
    (state, re), solved = inputs, []
    with torch.no_grad():
        for t in range(c.unroll):
            state = oracle.query(state, re)
            solved.append(state)
            state = state + model(features(state, re))
    scale = (1.0 / std).view(1, 2, 1, 1)
    loss = sum(((p + model(features(p, re)) - y[:, t]) * scale).pow(2).flatten(1).mean(1)
               for t, p in enumerate(solved)) / c.unroll
    hand = _flat(_grads(model, loss.mean()))
    assert torch.allclose(nog, hand, rtol=1e-5, atol=1e-9), float((nog - hand).abs().max())
    solver = KarmanSolver(c.data.low, backend="torch", jit=False)
    with phi().TORCH:
        detached = _flat(_grads(model, make_rollout(solver.step, std, detach_solver=True)(model, inputs, y).mean()))
        full = _flat(_grads(model, make_rollout(solver.step, std)(model, inputs, y).mean()))
    assert float((nog - detached).norm() / nog.norm()) < 1e-5  # the jitted oracle vs the plain solver: float32
    # FO-SOL's gradient also flows back through the solver into earlier corrections: a different vector
    # (here 53% of its norm apart)
    assert float((nog - full).norm() / full.norm()) > 0.2, float((nog - full).norm() / full.norm())
    with torch.no_grad():  # the same loss as ZO-SOL's objective: only the graph differs
        a = nog_rollout(oracle.query, std)(model, inputs, y)
        b = make_rollout(oracle.query, std)(model, inputs, y)
    assert torch.equal(a, b)


def test_nog_trains_through_the_oracle_with_its_rows_counted(data, data_dir, tmp_path):
    c = cfg(data_dir, steps=6, lr=3e-3, init="non", non_steps=20, out=tmp_path)
    non = train(c, "non")
    before = _objective(c, data, _load(c, data, tmp_path / "non"))
    res = train(c, "nog")
    after = _objective(c, data, _load(c, data, tmp_path / "nog"))
    assert after < before, (before, after)  # fine-tuning NON on the unrolled loss lowers it
    assert res["estimator"] == "autograd" and res["zeroth_order"] is False and res["queries"] == 0
    assert res["oracle_rows"] == 6 * c.batch * c.unroll  # one rollout per step, counted by the ledger
    assert res["ledger"]["oracles"]["phiflow-karman(nog)"]["rows"] == res["oracle_rows"]
    assert non["oracle_rows"] == 2 * 9  # NON's pair queries, unchanged
    rows = [json.loads(line) for line in (tmp_path / "nog" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["objective"] for r in rows} == {"2-step unrolled loss"}


def _load(c, data, folder):
    model = make_corrector(c, data)
    model.load_state_dict(torch.load(folder / "corrector.pt", weights_only=True))
    return model


def _objective(c, data, model):
    """Mean training rollout loss over every start window (deterministic, via the oracle)."""
    oracle = KarmanOracle(c.data.low, backend="torch")
    rollout = make_rollout(oracle.query, data.velocity_std())
    b = RolloutBatches(data.train, data.train_re, c.unroll, batch=data.train.shape[0] * (10 - c.unroll), seed=0)
    inputs, y = b.get_batch(0)
    with torch.no_grad():
        return float(rollout(model, inputs, y).mean())


def test_a_few_zo_steps_lower_the_loss(data, data_dir, tmp_path):
    c = cfg(data_dir, steps=10, out=tmp_path)
    before = _objective(c, data, make_corrector(c, data))
    res = train(c, "zo")
    model = make_corrector(c, data)
    model.load_state_dict(torch.load(tmp_path / "zo" / "corrector.pt", weights_only=True))
    after = _objective(c, data, model)
    assert after < 0.95 * before, (before, after)
    lpr = json.loads((tmp_path / "zo" / "lpr.json").read_text())
    assert lpr["score"] == "zo_grasp" and res["score_queries"] == 2 * (c.score_q + 1) == lpr["queries"]
    assert res["queries"] == res["score_queries"] + 10 * res["queries_per_step"]  # the ledger counts both
    assert res["oracle_rows"] == res["queries"] * c.batch * c.unroll
    rows = [json.loads(line) for line in (tmp_path / "zo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and all(r["queries"] == res["queries_per_step"] for r in rows)
    assert [r["sparsity_draw"] for r in rows] == list(range(10))  # redrawn every step


@pytest.mark.parametrize("method, key", [("zo", "steps"), ("non", "non_steps"), ("nog", "steps"), ("hybrid", "steps"),
                                         ("fo", "steps")])
def test_resume_is_exact(data, data_dir, tmp_path, method, key):
    full = cfg(data_dir, **{key: 4}, out=tmp_path / "full")
    train(full, method)
    part = cfg(data_dir, **{key: 2}, out=tmp_path / "part")
    train(part, method)
    res = train(cfg(data_dir, **{key: 4}, out=tmp_path / "part", resume=True), method)
    a = torch.load(tmp_path / "full" / method / "corrector.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / method / "corrector.pt", weights_only=True)
    assert res["steps"] == 4 and res["resumed_from_step"] == 2 and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "part" / method / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_cli_run_eval_new_conditions_and_the_folder_policy(data, data_dir, tmp_path):
    out = tmp_path / "run"
    flags = ["--nx", "16", "--train-re", "195.3,3125", "--test-re", "781.3", "--warmup", "30", "--frames", "10",
             "--corrector", "tiny", "--unroll", "2", "--batch", "2", "--steps", "3", "--score-q", "4",
             "--non-steps", "5", "--eval-steps", "4", "--sets-per-call", "8", "--data-dir", str(data_dir),
             "--no-progress"]
    r = CliRunner().invoke(main, ["sol", "run", "--out", str(out), *flags, "--methods", "src,non,nog,zo,hybrid,fo"])
    assert r.exit_code == 0, r.output
    assert "ZO-SOL" in r.output and "FO-SOL (white-box)" in r.output and "NOG (no solver gradient)" in r.output
    assert "ZO-SOL + NOG (hybrid_cge)" in r.output
    for f in ("results.json", "results.md", "vorticity.png", "mae_over_time.png", "loss.png", "config.resolved.yaml"):
        assert (out / f).exists(), f
    res = json.loads((out / "results.json").read_text())
    assert set(res["eval"]) == {"src", "non", "nog", "zo", "hybrid", "fo"} and res["eval"]["zo"]["steps"] == 4
    zo, hy = res["train"]["zo"], res["train"]["hybrid"]  # the completed estimator costs Sparse-CGE's queries
    assert hy["estimator"] == "hybrid_cge" and hy["zeroth_order"] and hy["queries_per_step"] == zo["queries_per_step"]
    assert res["train"]["non"]["oracle_rows"] == 2 * 9 and res["train"]["fo"]["solver_state_steps"] == 3 * 2 * 2
    assert res["train"]["nog"]["oracle_rows"] == 3 * 2 * 2 and res["train"]["nog"]["queries"] == 0
    r = CliRunner().invoke(main, ["sol", "eval", "--out", str(out), "--no-plots"])  # data dir from the run
    assert r.exit_code == 0, r.output
    assert json.loads((out / "eval.json").read_text())["eval"]["src"]["mae"] == res["eval"]["src"]["mae"]
    # a different setting in the same folder is refused, with the reason; more steps (resume) are not
    r = CliRunner().invoke(main, ["sol", "train", "--out", str(out), *flags, "--unroll", "3"])
    assert r.exit_code == 2 and "other settings (differs in: unroll" in r.output
    r = CliRunner().invoke(main, ["sol", "train", "--out", str(out), *flags, "--method", "zo", "--steps", "4",
                                  "--resume"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "zo" / "train.json").read_text())["steps"] == 4
    r = CliRunner().invoke(main, ["sol", "eval", "--out", str(out), "--methods", "non", "--no-plots"])
    assert r.exit_code == 0  # non is trained there
    # new held-out conditions: data generated for the run's other settings, every trained method evaluated
    r = CliRunner().invoke(main, ["sol", "eval", "--out", str(out), "--test-re", "400,1200", "--no-plots"])
    assert r.exit_code == 0, r.output
    new = json.loads((out / "eval-re-400,1200" / "eval.json").read_text())
    assert set(new["eval"]) == {"src", "non", "nog", "zo", "hybrid", "fo"} and list(new["eval"]["zo"]["mae_per_re"]) == ["400", "1200"]
    assert new["eval"]["src"]["mae"] != res["eval"]["src"]["mae"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "run.json").write_text((out / "run.json").read_text())
    r = CliRunner().invoke(main, ["sol", "eval", "--out", str(empty), "--methods", "zo", "--data-dir", str(data_dir)])
    assert r.exit_code == 2 and "none of the methods" in r.output
    r = CliRunner().invoke(main, ["sol", "eval", "--out", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "train there first" in r.output


def test_presets_build_and_the_paper_corrector_has_56898_parameters(data, data_dir):
    sizes = {}
    for name in SolSettings.PRESETS:
        c, _ = resolve(SolSettings, {"preset": name})
        sizes[name] = sum(p.numel() for p in make_corrector(c, data).parameters())
    assert sizes["paper"] == 56_898 and sizes["small"] == 2_618 and sizes["demo"] == 2_618
    demo, _ = resolve(SolSettings, {"preset": "demo"})
    small, _ = resolve(SolSettings, {"preset": "small"})
    for c in (demo, small):  # make demo runs the benchmark's protocol: NOG / ZO / FO fine-tune NON, cosine decay
        assert (c.init, c.schedule) == ("non", "cosine")
    assert small.methods == ("src", "non", "nog", "zo", "hybrid", "fo")
    assert demo.methods == ("src", "non", "nog", "hybrid", "fo")  # plain ZO-SOL only in the benchmark (time)
    p, _ = resolve(SolSettings, {"preset": "paper"})
    assert (p.unroll, p.lr, p.sparsity, p.data.nx, p.data.ny, p.data.factor) == (16, 1e-4, 0.95, 32, 64, 2)
    assert p.data.train_re == (97.7, 195.3, 390.6, 781.3, 1562.5, 3125.0)
    assert p.data.test_re == (146.5, 293.0, 585.9, 1171.9, 2343.8)
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve(SolSettings, {"preset": "huge"})
    with pytest.raises(ConfigError, match="corrector must be"):
        SolSettings(corrector="giant")
    with pytest.warns(DeprecationWarning, match="now called 'paper'"):
        assert SolSettings(corrector="mercury").corrector == "paper"
