"""Channel-level reuse: the same losses as a full forward (float64 round-off) on every model family, and the
stage-level path wherever a layer is not covered."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bbzo
from bbzo.adapters import FunctionalAdapter, StagedAdapter
from bbzo.models import create_model


def ce(o, t):
    return F.cross_entropy(o, t, reduction="none")


def mse(o, t):
    return (o - t).pow(2).flatten(1).mean(1)


def _probes(model, n, seed=0):
    params = {k: p.detach() for k, p in model.named_parameters()}
    est = bbzo.create_estimator("cge", mu=1e-3, difference="central")
    probes = est.ask(params, est.init(params))[0].probes
    if n is not None and n < len(probes):
        probes = probes.select(torch.sort(torch.randperm(len(probes), generator=torch.Generator().manual_seed(seed))[:n]).values)
    return probes


def _compare(model, x, y, loss, n=None, max_chunk=1024, rtol=1e-12):
    probes = _probes(model, n)
    adapter = StagedAdapter(model, max_chunk=max_chunk)
    a = adapter.bind(loss, x, y).probe_losses(probes)
    b = FunctionalAdapter(model).bind(loss, x, y).probe_losses(probes)
    assert float((a - b).abs().max()) <= rtol * max(1.0, float(b.abs().max())), float((a - b).abs().max())
    assert float((a - a.mean()).abs().max()) > 1e-8  # the probes did move the losses
    return adapter


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", ["simple_cnn", "simple_cnn_6670"])
def test_simple_cnn_family_matches_a_full_forward(name, mode):
    torch.manual_seed(0)
    model = getattr(create_model(name).double(), mode)()
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    adapter = _compare(model, x, y, ce, n=None if name == "simple_cnn" else 500, max_chunk=64)
    if name == "simple_cnn":  # a conv coordinate stays one channel through BN, ReLU, pools and flatten to the linear layer
        assert adapter.dense_from[0] == 7 and adapter.dense_from[1] == 7


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_resnet20_matches_a_full_forward(mode):
    torch.manual_seed(0)
    model = getattr(create_model("resnet20", num_classes=5).double(), mode)()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 5, (3,))
    adapter = _compare(model, x, y, ce, n=300)
    stages = adapter.stages
    # a block's conv2 coordinate stays one channel through bn2 and the residual add with relu
    conv2 = next(i for i, st in enumerate(stages) if getattr(st, "module", None) is model.layer1[0].conv2)
    if conv2 in adapter.dense_from:
        assert adapter.dense_from[conv2] >= conv2 + 3


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_dncnn_matches_a_full_forward(mode):
    torch.manual_seed(0)
    model = create_model("dncnn", depth=5, width=6).double()
    with torch.no_grad():  # a trained-looking last layer (it starts at zero)
        model.last.weight.normal_(0, 0.1)
    model = getattr(model, mode)()
    x = torch.rand(3, 3, 12, 12, dtype=torch.float64)
    _compare(model, x, x, mse, n=250)


def test_uncovered_layers_fall_back_to_the_stage_path():
    class Swap(nn.Module):  # mixes channels without being a conv: not covered
        def forward(self, x):
            return x.flip(1)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), Swap(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 3)).double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    adapter = _compare(model, x, y, ce)
    assert adapter.dense_from[0] == 1  # GroupNorm couples channels: dense from the next stage on


def test_mlp_and_channel_reuse_off_agree():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    _compare(model, x, y, ce)
    probes = _probes(model, None)
    off = StagedAdapter(model, channel_reuse=False)
    on = StagedAdapter(model)
    torch.testing.assert_close(on.bind(ce, x, y).probe_losses(probes), off.bind(ce, x, y).probe_losses(probes), rtol=0, atol=1e-13)
    assert not off.dense_from and on.dense_from


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bn_activation_pool_runs_on_pooled_values_with_negative_scales_and_overlapping_pools(mode):
    # [BN] [activation] max-pool is computed as act(BN(pool(v))): a negative BN scale turns the max into a min,
    # an overlapping padded pool and a pool right after a conv (no BN) are covered too
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.LeakyReLU(0.1), nn.MaxPool2d(3, 2, 1),
                          nn.Conv2d(5, 4, 3, padding=1), nn.ReLU6(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.5, -0.7, 0.9, -1.2, 0.4]))
        model[1].running_mean.normal_(0, 0.3)
        model[1].running_var.uniform_(0.5, 2.0)
    model = getattr(model, mode)()
    x = torch.randn(5, 3, 15, 15, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    adapter = _compare(model, x, y, ce, max_chunk=16)
    assert adapter.dense_from[0] == 5 and adapter.dense_from[4] == 9


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_conv_bn_act_pool_in_batch_blocks_matches_and_falls_back_where_statistics_would_cancel(mode, monkeypatch):
    import bbzo.adapters.channel as channel

    used = []
    real = channel.conv_pool_blocks

    def small_blocks(*a, **kw):  # blocks of one or two images: the sums and pools must stitch exactly
        out = real(*a, **{**kw, "block_bytes": 2 * 8 * 8 * 8})
        used.append(out is not None)
        return out

    monkeypatch.setattr(channel, "conv_pool_blocks", small_blocks)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.2, -0.8, 0.5, -1.5]))
        model[1].running_mean.normal_(0, 0.3)
    model = getattr(model, mode)()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    _compare(model, x, y, ce, max_chunk=20)
    assert used and all(used)
    used.clear()
    with torch.no_grad():  # a channel whose mean dwarfs its spread: sums of squares would cancel
        model[0].bias[2] = 1e4
    _compare(model, x, y, ce, max_chunk=20, rtol=1e-11)  # activations of 1e4: float64 round-off is 1e4 x 1e-16
    assert used and (all(used) if mode == "eval" else not all(used))


def test_a_fresh_adapter_and_a_used_one_give_bitwise_the_same_losses():
    """The chunk sizes may not depend on what an adapter saw before (else a resumed run drifts in float32)."""
    from bbzo.models import create_model

    torch.manual_seed(0)
    model = create_model("simple_cnn_730").train()
    x, other = torch.randn(12, 3, 16, 16), torch.randn(12, 3, 16, 16)
    y = torch.randint(0, 10, (12,))
    probes = _probes(model, None)
    used = StagedAdapter(model, max_chunk_bytes=1 << 20)
    used.bind(ce, other, y).probe_losses(probes)
    a = used.bind(ce, x, y).probe_losses(probes)
    b = StagedAdapter(model, max_chunk_bytes=1 << 20).bind(ce, x, y).probe_losses(probes)
    assert torch.equal(a, b)


@pytest.mark.parametrize("conv2", [dict(kernel_size=3, padding=1), dict(kernel_size=(3, 2), stride=2, padding=(2, 1)),
                                   dict(kernel_size=3, dilation=2, padding=0, stride=(1, 2)),
                                   dict(kernel_size=5, padding=2, out_channels=2)])  # 25 taps > 4x2: grouped conv
def test_mixing_conv_with_strides_dilations_and_padding_matches_a_full_forward(conv2):
    torch.manual_seed(0)
    kw = {"out_channels": 5, **conv2}
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, **kw),
                          nn.BatchNorm2d(kw["out_channels"]), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(kw["out_channels"], 3)).double()
    x = torch.randn(5, 3, 11, 10, dtype=torch.float64)
    adapter = _compare(model, x, torch.randint(0, 3, (5,)), ce, max_chunk=7)
    assert adapter.dense_from[0] == 4  # the first conv's channel became dense at the mixing conv (stage 3)


def test_the_chunk_bound_holds_the_dense_downstreams_working_set_on_cpu():
    """On CPU a chunk of K sets keeps DENSE_SETS_CPU dense activations of each set under ``max_chunk_bytes``."""
    from bbzo.adapters.common import DENSE_SETS_CPU

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1),
                          nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).train()
    x, y = torch.randn(8, 3, 12, 12), torch.randint(0, 3, (8,))
    dense_bytes = 8 * 6 * 12 * 12 * 4  # the mixing conv's (and BN's) output, one set
    bound = 3 * DENSE_SETS_CPU * dense_bytes + 1
    probes = _probes(model, None)
    probes = probes.select(torch.nonzero(probes.pidx == 0).flatten())  # the first conv's weights: dense from stage 4
    ev = StagedAdapter(model, max_chunk_bytes=bound).bind(ce, x, y)
    sizes, loss = [], ev._loss
    ev._loss = lambda out, k: (sizes.append(k), loss(out, k))[1]
    ev.probe_losses(probes)
    assert max(sizes) == 3 and sum(sizes) == len(probes)
