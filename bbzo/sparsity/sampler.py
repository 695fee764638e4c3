"""Dynamic sparsity (DeepZero Alg. 1-2): redraw, every K steps, a uniformly random coordinate set
inside each layer with exactly the LPR's count, and estimate only those coordinates (Sparse-CGE)
while the *dense* model is trained.

The set of step ``t`` is a pure function of ``(seed, t // resample_every)``, so a resumed run draws
exactly the sets the uninterrupted run would have drawn (nothing to checkpoint beyond the step).

It is a coordinate *schedule*: ``masked(create_estimator("cge"), sampler)`` estimates, at step ``t``,
exactly ``sampler.coords_at(t)`` (:func:`bbzo.estimators.masked`); nothing mutates the estimator.

Tensors the LPR does not name (BatchNorm affine parameters, biases) follow ``others``:

* ``"dense"`` (default, as DeepZero's reference): estimated on every coordinate every step;
* ``"sparse"``: drawn like weights, at the LPR's global kept fraction ``1 - sparsity``;
* ``"frozen"``: not estimated (zero gradient; the optimizer's weight decay still acts).
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import torch

from ..errors import ConfigError
from .lpr import LayerRatios

__all__ = ["DynamicSparsity", "OTHERS"]

OTHERS = ("dense", "sparse", "frozen")


class DynamicSparsity:
    """Per-layer uniform coordinate sets at the LPR's counts, redrawn every ``resample_every`` steps.

    Args:
        lpr: Layer-wise kept counts (:class:`~bbzo.sparsity.lpr.LayerRatios`).
        params: The trainable parameters ``{name: tensor}`` (checked against the LPR).
        resample_every: Redraw period in steps (0: draw once and keep it).
        seed: Seed of the draws.
        others: ``"dense"`` | ``"sparse"`` | ``"frozen"`` for tensors the LPR does not name.
    """

    def __init__(self, lpr: LayerRatios, params: Mapping[str, torch.Tensor], *, resample_every: int = 0,
                 seed: int = 0, others: str = "dense") -> None:
        if resample_every < 0:
            raise ConfigError(f"resample_every must be >= 0 steps, got {resample_every}.")
        if others not in OTHERS:
            raise ConfigError(f"others must be one of {OTHERS}, got {others!r}.")
        lpr.check_model(params)
        self.lpr, self.resample_every, self.seed, self.others = lpr, int(resample_every), int(seed), others
        self.sizes = {n: int(p.numel()) for n, p in params.items()}
        self.counts: dict[str, int] = {}
        for n, size in self.sizes.items():
            if n in lpr.kept:
                self.counts[n] = lpr.kept[n]
            elif others == "sparse":
                self.counts[n] = int(round((1.0 - lpr.sparsity) * size))
            elif others == "dense":
                self.counts[n] = size
        self._cache: Optional[tuple[int, dict[str, torch.Tensor]]] = None

    @property
    def coords_per_step(self) -> int:
        """Coordinates estimated per step (Sparse-CGE forward cost is this + 1 queries)."""
        return sum(self.counts.values())

    def draw_index(self, step: int) -> int:
        return 0 if self.resample_every == 0 else step // self.resample_every

    def coords(self, draw: int) -> dict[str, torch.Tensor]:
        """``{name: sorted int64 flat indices}`` of draw ``draw`` (exactly ``counts[name]`` each)."""
        if self._cache is not None and self._cache[0] == draw:
            return dict(self._cache[1])
        out: dict[str, torch.Tensor] = {}
        for j, (n, k) in enumerate(self.counts.items()):
            size = self.sizes[n]
            if k == size:
                out[n] = torch.arange(size)
                continue
            ss = np.random.SeedSequence([self.seed & 0xFFFFFFFF, int(draw), j])
            g = torch.Generator().manual_seed(int(ss.generate_state(1, np.uint64)[0] & ((1 << 63) - 1)))
            out[n] = torch.sort(torch.randperm(size, generator=g)[:k]).values
        self._cache = (int(draw), out)
        return dict(out)

    def coords_at(self, step: int) -> dict[str, torch.Tensor]:
        return self.coords(self.draw_index(step))
