"""Stage runners on K stacked activations: every rule equals running the stage on each set alone, in both the
standard and the stacked channels-last layout, and the channel path's mixed residual step equals a full forward."""

import pytest
import torch
from torch import nn

from bbzo.adapters.runners import first_only, fused_runner, is_stacked, stage_runner
from bbzo.models.resnet_cifar import ShortcutA
from bbzo.stages import Fork, Merge, OnFirst

from .test_channel import _compare, ce

B, K, C, H = 4, 3, 4, 6


def _stacked(x: torch.Tensor) -> torch.Tensor:
    """The same values in the stacked layout (memory ``(K, B, H, W, C)``)."""
    return x.permute(1, 0, 3, 4, 2).contiguous().permute(1, 0, 4, 2, 3)


def _per_set(stage: nn.Module, act, k: int):
    """Reference: the stage on each set's ``(B, ...)`` batch alone, stacked back to ``(B, K, ...)``."""
    def pick(a, i):
        return tuple(t[:, i] for t in a) if isinstance(a, tuple) else a[:, i]
    outs = [stage(pick(act, i)) for i in range(k)]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack([o[j] for o in outs], 1) for j in range(len(outs[0])))
    return torch.stack(outs, 1)


def _stages():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(C)
    with torch.no_grad():
        bn.weight.uniform_(-1.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    return {
        "conv": nn.Conv2d(C, 5, 3, padding=1),
        "conv_strided_dilated_grouped": nn.Conv2d(C, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=False),
        "bn_train": bn, "bn_eval": bn,
        "relu": nn.ReLU(), "leaky": nn.LeakyReLU(0.2),
        "maxpool": nn.MaxPool2d(2), "maxpool_overlap": nn.MaxPool2d(3, 2, 1), "avgpool": nn.AvgPool2d(3, 1, 1),
        "adaptive": nn.AdaptiveAvgPool2d(2),
        "onfirst_conv": OnFirst(nn.Conv2d(C, C, 3, padding=1)),
        "onfirst_bn_train": OnFirst(bn),
        "merge": Merge(None, nn.ReLU()), "merge_subtract": Merge(None, None, subtract=True),
        "merge_shortcut_a": Merge(ShortcutA(C, 2 * C, 2), nn.ReLU()),
        "fork": Fork(),
    }


@pytest.mark.parametrize("layout", ["standard", "stacked"])
@pytest.mark.parametrize("name", list(_stages()))
def test_every_runner_equals_each_set_alone(name, layout):
    stage = _stages()[name]
    stage.double().train(not name.endswith("eval"))
    torch.manual_seed(1)
    x = torch.randn(B, K, C, H, H, dtype=torch.float64)
    if name.startswith("merge_shortcut_a"):
        act = (torch.randn(B, K, 2 * C, H // 2, H // 2, dtype=torch.float64), x)
    elif name.startswith(("onfirst", "merge")):
        act = (torch.randn(B, K, C, H, H, dtype=torch.float64), x)
    else:
        act = x
    lay = (lambda t: _stacked(t)) if layout == "stacked" else (lambda t: t)
    act_in = tuple(lay(t) for t in act) if isinstance(act, tuple) else lay(act)
    with torch.no_grad():
        saved = {k: v.clone() for k, v in stage.state_dict().items()}
        got = stage_runner(stage)(act_in, K)
        stage.load_state_dict(saved)
        for m in stage.modules():  # the reference must not move the running statistics either
            if isinstance(m, nn.BatchNorm2d):
                m.track_running_stats = False
        want = _per_set(stage, act, K)
    got_t = got if isinstance(got, tuple) else (got,)
    want_t = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got_t, want_t):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_cpu_convs_run_stacked_channels_last_and_per_channel_stages_keep_the_layout():
    conv, bn = nn.Conv2d(C, 8, 3, padding=1).double(), nn.BatchNorm2d(8).double()
    x = torch.randn(B, K, C, H, H, dtype=torch.float64)
    with torch.no_grad():
        y = stage_runner(conv)(x, K)
        z = stage_runner(bn)(y, K)
        e = stage_runner(bn.eval())(z, K)
        p = stage_runner(nn.MaxPool2d(2))(e, K)
        r = stage_runner(OnFirst(nn.ReLU()))((p, x), K)[0]
    assert is_stacked(_stacked(x)) and not is_stacked(x) and not is_stacked(_stacked(x).contiguous())
    for t in (y, z, e, p, r):
        assert t.shape[:3] == (B, K, 8) and is_stacked(t)
        assert t.transpose(0, 1).reshape(K * B, *t.shape[2:]).is_contiguous(memory_format=torch.channels_last)
    assert first_only(OnFirst(conv)) and not first_only(OnFirst(nn.Flatten())) and not first_only(conv)


def _residual(subtract: bool, post: nn.Module) -> nn.Sequential:
    # conv -> Fork: a coordinate of the first conv changes one channel of the branch *and* of the skip; the branch
    # becomes dense at its conv while the skip still carries the one channel (the mixed step adds it at the Merge)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), Fork(),
                         OnFirst(nn.Conv2d(4, 4, 3, padding=1)), OnFirst(nn.BatchNorm2d(4)), OnFirst(nn.ReLU()),
                         OnFirst(nn.Conv2d(4, 4, 3, padding=1)), Merge(None, post, subtract=subtract),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("subtract", [False, True])
def test_mixed_residual_step_matches_a_full_forward(subtract, mode):
    torch.manual_seed(0)
    model = getattr(_residual(subtract, nn.ReLU() if not subtract else nn.Tanh()), mode)()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    adapter = _compare(model, x, y, ce, max_chunk=7)
    # the first conv's coordinates went the mixed way: dense from the branch conv (stage 4) on
    assert adapter.dense_from[0] == 5


@pytest.mark.parametrize("layout", ["standard", "stacked"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("wrap", [False, True])
def test_fused_batch_norm_relu_equals_the_two_stages(wrap, mode, layout):
    bn = _stages()["bn_train"].double().train(mode == "train")
    pair = (OnFirst(bn), OnFirst(nn.ReLU())) if wrap else (bn, nn.ReLU())
    torch.manual_seed(2)
    x = torch.randn(B, K, C, H, H, dtype=torch.float64) + 3.0
    lay = _stacked(x) if layout == "stacked" else x
    act = (lay, torch.randn(B, K, C, H, H, dtype=torch.float64)) if wrap else lay
    before = lay.clone()
    with torch.no_grad():
        got = fused_runner(*pair)(act, K)
        want = stage_runner(pair[1])(stage_runner(pair[0])(act, K), K)
        ref = _per_set(nn.Sequential(bn, nn.ReLU()).train(mode == "train"), x, K)
    if wrap:
        assert got[1] is act[1]
        got, want = got[0], want[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert (layout == "stacked") == is_stacked(got)
    assert torch.equal(lay, before)  # the input is untouched (the ReLU ran in place on BN's own output)


def test_only_batch_norm_then_relu_fuses():
    bn = nn.BatchNorm2d(C)
    assert fused_runner(bn, nn.ReLU()) is not None and fused_runner(OnFirst(bn), OnFirst(nn.ReLU())) is not None
    assert fused_runner(bn, nn.Tanh()) is None and fused_runner(OnFirst(bn), nn.ReLU()) is None
    assert fused_runner(nn.ReLU(), nn.ReLU()) is None and fused_runner(nn.Conv2d(C, C, 1), nn.ReLU()) is None
