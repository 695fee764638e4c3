"""Small models and losses for the tests (float64, data generated here)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bbzo.oracle import Oracle


class Quadratic(nn.Module):
    """``f(w) = 0.5 (w - c)^T A (w - c)`` per sample (the input is ignored beyond the batch size)."""

    def __init__(self, d: int = 7) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        m = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.register_buffer("A", m @ m.T / d + torch.eye(d, dtype=torch.float64))
        self.register_buffer("c", torch.randn(d, generator=g, dtype=torch.float64))
        self.w = nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.w - self.c
        val = 0.5 * r @ self.A @ r
        return val.expand(x.shape[0], 1) + 0 * x[:, :1]


def quad_loss(out: torch.Tensor, t: object) -> torch.Tensor:
    return out[:, 0]


def mlp64() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def cnn_bn64() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 3, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Flatten(), nn.Linear(3 * 2 * 2, 3),
    ).double()


def ce_loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, t, reduction="none")


def problems(seed: int = 2):
    """name -> (model, inputs, targets, loss_fn), all float64, deterministic for a seed."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    return {
        "quadratic": (Quadratic(), torch.zeros(5, 1, dtype=torch.float64), None, quad_loss),
        "mlp": (mlp64(), torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g), ce_loss),
        "cnn_bn": (cnn_bn64().train(), torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64),
                   torch.randint(0, 3, (6,), generator=g), ce_loss),
    }


def autograd_grads(model, inputs, targets, loss_fn):
    from bbzo.adapters import frozen_bn_stats
    with frozen_bn_stats(model):
        loss = loss_fn(model(inputs), targets).mean()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    gs = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return dict(zip(names, gs))


def rel_err(a: dict, b: dict) -> float:
    num = sum(((a[k] - b[k]) ** 2).sum() for k in b) ** 0.5
    den = sum((b[k] ** 2).sum() for k in b) ** 0.5
    return float(num / den)


class SpyOracle(Oracle):
    """Records what it receives; answers with a fixed random linear map."""

    def __init__(self, d_in: int, d_out: int, **kw) -> None:
        super().__init__(**kw)
        g = torch.Generator().manual_seed(3)
        self.W = torch.randn(d_in, d_out, generator=g, dtype=torch.float64)
        self.saw_requires_grad = []
        self.row_counts = []

    def _query(self, inputs: torch.Tensor) -> torch.Tensor:
        self.saw_requires_grad.append(inputs.requires_grad)
        self.row_counts.append(inputs.shape[0])
        return torch.tanh(inputs.to(torch.float64) @ self.W).to(inputs.dtype)


def grad(*args, **kw) -> dict:
    """``bbzo.estimate_grad(...)``'s gradient (the first of ``(grads, state)``)."""
    import bbzo

    return bbzo.estimate_grad(*args, **kw)[0]


def tiny_images(n, seed):
    """``(n, 32, 32, 3)`` uint8 images whose class (n % 10) sets a colour and a bright quadrant, plus noise."""
    g = np.random.default_rng(seed)
    y = np.arange(n) % 10
    x = g.integers(0, 80, size=(n, 32, 32, 3)).astype(np.int64)
    for i, c in enumerate(y):
        x[i, :, :, c % 3] += 60 + 15 * c
        r, q = divmod(c % 4, 2)
        x[i, 16 * r:16 * r + 16, 16 * q:16 * q + 16, :] += 60
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


def tiny_cifar_npz(path):
    """A CIFAR-10-layout ``.npz`` (``train_x/train_y/test_x/test_y``) of 200 training and 100 test tiny images."""
    tx, ty = tiny_images(200, 0)
    vx, vy = tiny_images(100, 1)
    np.savez(path, train_x=tx, train_y=ty, test_x=vx, test_y=vy)
    return path
