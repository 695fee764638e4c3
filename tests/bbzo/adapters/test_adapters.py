"""Feature reuse equals plain batched evaluation; BatchNorm semantics; sharding; ResNet-20 stages."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bbzo
from bbzo.adapters import FunctionalAdapter, StagedAdapter, make_adapter, model_stages
from bbzo.errors import ConfigError, NonFiniteError, ShapeError
from bbzo.messages import Request
from bbzo.models import create_model
from bbzo.parallel import SerialExecutor
from tests.helpers import autograd_grads, ce_loss, cnn_bn64, grad, rel_err


def _max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_feature_reuse_cge_equals_plain_cge_float64(mode):
    model = cnn_bn64()
    getattr(model, mode)()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    est = lambda: bbzo.create_estimator("cge", mu=1e-3)  # noqa: E731
    plain = grad(model, ce_loss, x, y, est(), feature_reuse=False)
    reuse = grad(model, ce_loss, x, y, est(), feature_reuse=True)
    assert _max_diff(plain, reuse) <= 1e-10


def test_resnet20_stages_compose_to_forward_and_reuse_matches_plain():
    model = create_model("resnet20", num_classes=4).double().train()
    assert sum(p.numel() for p in create_model("resnet20").parameters()) == 269_722
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 4, (4,))
    a = x
    with torch.no_grad():
        for st in model_stages(model):
            a = st(a)
        assert torch.allclose(a, model(x), atol=1e-12, rtol=0)
    g = torch.Generator().manual_seed(0)
    coords = {n: torch.randperm(p.numel(), generator=g)[:3] for n, p in model.named_parameters()}
    plain = grad(model, ce_loss, x, y, bbzo.create_estimator("sparse_cge", coords=coords, mu=1e-3),
                               feature_reuse=False)
    reuse = grad(model, ce_loss, x, y, bbzo.create_estimator("sparse_cge", coords=coords, mu=1e-3))
    assert _max_diff(plain, reuse) <= 1e-10
    assert any(float(v.abs().max()) > 0 for v in reuse.values())


def test_train_mode_queries_use_per_perturbation_batch_stats_and_never_touch_running_stats():
    model = cnn_bn64().train()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = grad(model, ce_loss, x, y, bbzo.create_estimator("cge", mu=1e-6))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed during queries"
    # the estimate is the gradient of the train-mode (batch-statistics) loss ...
    ref_train = autograd_grads(model, x, y, ce_loss)
    assert rel_err(g, ref_train) < 1e-5
    # ... which differs from the eval-mode (running-statistics) gradient
    model.eval()
    ref_eval = autograd_grads(model, x, y, ce_loss)
    g_eval = grad(model, ce_loss, x, y, bbzo.create_estimator("cge", mu=1e-6))
    assert rel_err(g_eval, ref_eval) < 1e-5
    assert rel_err(ref_train, ref_eval) > 0.05


@pytest.mark.parametrize("adapter_cls", [FunctionalAdapter, StagedAdapter])
def test_sharded_evaluation_combines_exactly_and_chunking_does_not_matter(adapter_cls):
    model = cnn_bn64().train()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    params = {n: p.detach() for n, p in model.named_parameters()}
    est = bbzo.create_estimator("cge", difference="central")
    request, _ = est.ask(params, est.init(params))
    whole = adapter_cls(model).bind(ce_loss, x, y).probe_losses(request.probes)
    assert whole.shape == (len(request.probes), 5)
    for n_shards, max_chunk in [(3, 1024), (7, 5), (1, 1)]:
        ev = adapter_cls(model, max_chunk=max_chunk).bind(ce_loss, x, y)
        out = SerialExecutor(n_shards).evaluate(ev, Request(request.probes, per_sample=True))
        assert float((out.per_sample - whole).abs().max()) <= 1e-12
        assert out.spent.queries == ev.ledger.queries == len(request.probes)
        assert out.calls == (len(request.probes) + max_chunk - 1) // max_chunk if adapter_cls is FunctionalAdapter \
            and n_shards == 1 else out.calls >= 1


def test_rge_shards_regenerate_directions():
    model = cnn_bn64().eval()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    params = {n: p.detach() for n, p in model.named_parameters()}
    est = bbzo.create_estimator("rge", q=6)
    request, _ = est.ask(params, est.init(params))
    ev = FunctionalAdapter(model).bind(ce_loss, x, y)
    one = SerialExecutor(1).evaluate(ev, request).losses
    three = SerialExecutor(3).evaluate(ev, request).losses
    assert torch.allclose(one, three, atol=1e-13, rtol=0) and float(one.std()) > 0


def test_models_without_stages_use_torch_func_and_feature_reuse_true_explains():
    class Free(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3).double()

        def forward(self, x):
            return self.a(x) + x

    with pytest.raises(ConfigError, match="bbzo_stages"):
        make_adapter(Free(), feature_reuse=True)
    assert isinstance(make_adapter(Free()), FunctionalAdapter)
    m = Free()
    x = torch.randn(4, 3, dtype=torch.float64)
    loss = lambda o, t: o.pow(2).sum(1)  # noqa: E731
    assert rel_err(grad(m, loss, x, None, bbzo.create_estimator("cge", mu=1e-6)),
                   autograd_grads(m, x, None, loss)) < 1e-5


def test_bad_loss_shape_and_nan_loss_are_clear_errors():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ShapeError, match="per-sample losses"):
        grad(model, lambda o, t: o.sum(), x, None, bbzo.create_estimator("cge"))
    with pytest.raises(NonFiniteError, match="NaN/inf for 16 of 16 perturbed parameter sets"):
        grad(model, lambda o, t: o.sum(1) * float("nan"), x, None, bbzo.create_estimator("cge", difference="central"))


def test_eval_mode_is_respected_and_dropout_models_run():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double().eval()
    x = torch.randn(4, 3, dtype=torch.float64)
    loss = lambda o, t: o.pow(2).sum(1)  # noqa: E731
    g = grad(model, loss, x, None, bbzo.create_estimator("cge", mu=1e-6))
    assert rel_err(g, autograd_grads(model, x, None, loss)) < 1e-5
    assert not model.training


def test_linear_shortcut_handles_strided_grouped_dilated_convs():
    model = nn.Sequential(
        nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 2),
    ).double()
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    loss = lambda o, t: o.pow(2).sum(1)  # noqa: E731
    est = lambda: bbzo.create_estimator("cge", mu=1e-3)  # noqa: E731
    assert _max_diff(grad(model, loss, x, None, est(), feature_reuse=False),
                     grad(model, loss, x, None, est(), feature_reuse=True)) <= 1e-10


def test_float32_resnet_reuse_close_to_plain():
    model = create_model("resnet20").train()
    x = torch.randn(3, 3, 32, 32)
    y = torch.randint(0, 10, (3,))
    coords = {"layer2.1.conv2.weight": torch.arange(0, 9216, 997), "fc.bias": torch.arange(10)}
    est = lambda: bbzo.create_estimator("sparse_cge", coords=coords, mu=5e-3)  # noqa: E731
    a = grad(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), x, y, est(), feature_reuse=False)
    b = grad(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), x, y, est())
    # float32 rounding of (f(x+mu)-f(x))/mu: of the order of eps32 * |f| / mu, the same for both paths
    ref = grad(model.double(), lambda o, t: F.cross_entropy(o, t, reduction="none"), x.double(), y,
                             est(), feature_reuse=False)
    scale = max(float(v.abs().max()) for v in ref.values())
    assert _max_diff(a, b) < 0.05 * scale
    assert _max_diff(a, ref) < 0.05 * scale and _max_diff(b, ref) < 0.05 * scale


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("feature_reuse", [False, True])
def test_cuda_matches_autograd(feature_reuse):
    model = cnn_bn64().cuda().train()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64, device="cuda")
    y = torch.randint(0, 3, (6,), device="cuda")
    g = grad(model, ce_loss, x, y, bbzo.create_estimator("cge", mu=1e-6), feature_reuse=feature_reuse)
    assert all(v.device.type == "cuda" for v in g.values())
    assert rel_err(g, autograd_grads(model, x, y, ce_loss)) < 1e-5


def test_block_probes_reuse_features_exactly():
    """Directions confined to one tensor: the staged fast path equals a full forward per probe."""
    import torch.nn.functional as F

    from bbzo.adapters import FunctionalAdapter, StagedAdapter
    from bbzo.models import create_model
    from bbzo.probes import BlockProbes

    torch.manual_seed(0)
    model = create_model("resnet20").double().train()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (4,))

    def lf(o, t):
        return F.cross_entropy(o, t, reduction="none")

    staged = StagedAdapter(model).bind(lf, x, y)
    plain = FunctionalAdapter(model).bind(lf, x, y)
    names = tuple(staged.params)
    for n in ("conv1.weight", "layer2.1.conv2.weight", "layer3.0.bn1.bias", "fc.weight", "fc.bias"):
        numel = staged.params[n].numel()
        g = torch.Generator().manual_seed(len(n))
        probes = BlockProbes(names, names.index(n), torch.randn(3, numel, generator=g, dtype=torch.float64),
                             torch.tensor([1e-2, -1e-2, 3e-2], dtype=torch.float64))
        a, b = staged.probe_losses(probes), plain.probe_losses(probes)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        assert float((a.mean(1) - staged.base_losses().mean()).abs().max()) > 1e-6, n  # the probes did move the loss
