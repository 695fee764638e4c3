"""Stages: a residual block written with Fork / OnFirst / Merge computes what the plain block computes."""

import torch
from torch import nn

from bbzo.stages import Fork, Merge, OnFirst, model_stages


def test_fork_onfirst_merge_compose_a_residual_block():
    torch.manual_seed(0)
    conv, short = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1)
    x = torch.randn(2, 3, 5, 5)
    stages = [Fork(), OnFirst(conv), Merge(short, nn.ReLU())]
    a = x
    for st in stages:
        a = st(a)
    torch.testing.assert_close(a, torch.relu(conv(x) + short(x)))
    sub = Merge(subtract=True)((conv(x), x))  # DnCNN's form: the branch predicts what to remove
    torch.testing.assert_close(sub, x - conv(x))


def test_model_stages_flattens_sequentials_and_asks_models_that_declare_stages():
    inner = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    seq = nn.Sequential(inner, nn.Linear(2, 1))
    assert [type(m).__name__ for m in model_stages(seq)] == ["Linear", "ReLU", "Linear"]

    class Declared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

        def bbzo_stages(self):
            return [self.a, self.b]

        def forward(self, x):
            return self.b(self.a(x))

    assert model_stages(Declared())[1] is not None and len(model_stages(Declared())) == 2
    assert model_stages(nn.Linear(2, 2)) is None  # nothing declared: only the generic adapter applies
