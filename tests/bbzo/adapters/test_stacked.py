"""Whole parameter sets stacked through staged models (RGE directions) equal a per-direction loop of forwards."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import bbzo
from bbzo.adapters import FunctionalAdapter, StagedAdapter, frozen_bn_stats
from bbzo.adapters import staged
from bbzo.adapters.staged import STACKED
from bbzo.adapters.stacked import stacked_plan
from bbzo.models import create_model
from bbzo.probes import DirectionProbes
from bbzo.stages import Fork, Merge, OnFirst


def _probes(model, m=7, seed=3, distribution="gaussian", mu=1e-2):
    params = {n: p.detach() for n, p in model.named_parameters()}
    delta = torch.full((m,), mu, dtype=torch.float64)
    delta[1::2] = -mu
    return DirectionProbes(tuple(params), tuple(p.shape for p in params.values()), seed=seed,
                           dirs=torch.arange(m), delta=delta, distribution=distribution)


def _loop(model, probes, x, y):
    """The reference: one plain forward per direction (BN statistics of that perturbed set, running ones frozen)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    rows = []
    with torch.no_grad(), frozen_bn_stats(model):
        for j in range(len(probes)):
            u = probes.direction(int(probes.dirs[j]))
            moved = {n: params[n] + (float(probes.delta[j]) * un).to(params[n].dtype) for n, un in zip(probes.names, u)}
            rows.append(F.cross_entropy(functional_call(model, moved, (x,)), y, reduction="none"))
    return torch.stack(rows)


def _ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _cnn(depth=2, act=nn.ReLU, pool=True, gap=True):
    layers, c = [], 3
    for _ in range(depth):
        layers += [nn.Conv2d(c, 4, 3, padding=1), nn.BatchNorm2d(4), act()] + ([nn.MaxPool2d(2)] if pool else [])
        c = 4
    layers += ([nn.AdaptiveAvgPool2d(1)] if gap else []) + [nn.Flatten(), nn.LazyLinear(3) if not gap else nn.Linear(4, 3)]
    return nn.Sequential(*layers)


class _Block(nn.Module):
    """A residual block with a parameterised (conv + BN) shortcut, declared as stages."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.short = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6))

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) + self.short(x))

    def bbzo_stages(self):
        return [Fork(), OnFirst(self.conv), OnFirst(self.bn), Merge(self.short, nn.ReLU())]


def _grouped_negative_bn():
    """A grouped conv block after the head whose BN scales are partly negative (the pool must then follow BN)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model[4].weight.copy_(torch.tensor([1.0, -0.7, 0.5, -1.2]))
    return model


MODELS = {
    "grouped_negative_bn": _grouped_negative_bn,
    "simple_cnn_730": lambda: create_model("simple_cnn_730", num_classes=3),
    "cnn_depth2": lambda: _cnn(2),
    "cnn_leaky_nopool": lambda: nn.Sequential(*_cnn(1, act=lambda: nn.LeakyReLU(0.1), pool=False)),
    "cnn_no_gap": lambda: _cnn(1, gap=False),
    "residual": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), _Block(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)),
    "resnet20": lambda: create_model("resnet20", num_classes=3),
    "mlp_bn": lambda: nn.Sequential(nn.Flatten(), nn.Linear(48, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(MODELS))
def test_stacked_directions_equal_a_loop_of_forwards_float64(name, mode):
    torch.manual_seed(0)
    model = MODELS[name]()
    size = 8 if name != "resnet20" else 8
    x = torch.randn(5, 3, size, size, dtype=torch.float64) if name != "mlp_bn" else torch.randn(5, 3, 4, 4).double()
    model = model.double()
    with torch.no_grad():
        model(x)  # materialise lazy layers
        for m in model.modules():  # running statistics that differ from a batch's
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    getattr(model, mode)()
    y = torch.randint(0, 3, (5,))
    adapter = StagedAdapter(model)
    assert adapter.stacked is not None
    probes = _probes(model)
    ev = adapter.bind(_ce, x, y)
    assert {c for c, _ in ev.chunks(probes)} == {STACKED}
    got = ev.probe_losses(probes)
    want = _loop(model, probes, x, y)
    assert got.shape == (7, 5)
    assert float((got - want).abs().max()) <= 1e-11
    assert float((want[0] - want[1]).abs().max()) > 1e-6  # the directions really move the loss
    # the queries never touch running statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ev.probe_losses(probes)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("distribution", ["sphere", "tensor_sphere"])
def test_stacked_directions_other_distributions(distribution):
    torch.manual_seed(1)
    model = _cnn(1).double().train()
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (4,))
    probes = _probes(model, m=4, distribution=distribution)
    got = StagedAdapter(model).bind(_ce, x, y).probe_losses(probes)
    assert float((got - _loop(model, probes, x, y)).abs().max()) <= 1e-11


def test_head_chunks_are_invariant_bitwise_float32(monkeypatch):
    """A sub-batch made of whole chunks gives bitwise the numbers of the whole batch (a distributed run deals chunks)."""
    torch.manual_seed(2)
    model = create_model("simple_cnn_730", num_classes=10).train()
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    adapter = StagedAdapter(model, max_chunk_bytes=50_000)
    probes = _probes(model, m=40, mu=5e-3)
    ev = adapter.bind(_ce, x, y)
    chunks = ev.chunks(probes)
    assert len(chunks) >= 3 and all(c == STACKED for c, _ in chunks)
    whole = ev.probe_losses(probes)
    for _, rows in chunks[1::2]:  # every other chunk, each evaluated by a fresh evaluator
        part = adapter.bind(_ce, x, y).probe_losses(probes.select(rows))
        assert torch.equal(part, whole[rows])
    joined = torch.cat([rows for _, rows in chunks[::2]])
    assert torch.equal(adapter.bind(_ce, x, y).probe_losses(probes.select(joined)), whole[joined])
    # one chunk for every direction (no cap): the cap only changes how the GEMMs are blocked, so round-off alone
    monkeypatch.setattr(staged, "STACKED_MAX_SETS", 10**6)
    one = StagedAdapter(model).bind(_ce, x, y)
    assert len(one.chunks(probes)) == 1 and float((one.probe_losses(probes) - whole).abs().max()) <= 2e-5
    # float32 against the plain loop: round-off only
    ref = _loop(model, probes, x, y)
    assert float((whole - ref).abs().max()) <= 2e-5


def test_rge_through_staged_equals_functional_and_the_previous_path():
    torch.manual_seed(3)
    model = _cnn(2).double().train()
    x, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
    est = bbzo.create_estimator("rge", q=9, mu=1e-4, seed=5)
    staged = bbzo.step.estimate(StagedAdapter(model), est, _ce, x, y)
    functional = bbzo.step.estimate(FunctionalAdapter(model), est, _ce, x, y)
    old = bbzo.step.estimate(StagedAdapter(model, stacked_directions=False), est, _ce, x, y)
    for n in staged.grads:
        assert float((staged.grads[n] - functional.grads[n]).abs().max()) <= 1e-9
        assert torch.equal(functional.grads[n], old.grads[n])
    assert staged.queries == functional.queries == 10
    assert any(float(g.abs().max()) > 1e-3 for g in staged.grads.values())


def test_models_without_a_rule_fall_back_to_torch_func():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.s

    model = nn.Sequential(nn.Linear(4, 3), Scale()).double()
    assert stacked_plan(list(model)) is None
    adapter = StagedAdapter(model)
    assert adapter.stacked is None
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    probes = _probes(model, m=3)
    ev = adapter.bind(_ce, x, y)
    assert {c for c, _ in ev.chunks(probes)} == {-1}
    assert float((ev.probe_losses(probes) - _loop(model, probes, x, y)).abs().max()) <= 1e-12
