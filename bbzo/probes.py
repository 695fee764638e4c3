"""Probes: the perturbed parameter sets an estimator asks to have evaluated, and the protocol adapters use.

An estimator *asks* for a batch of probes and is *told* their losses (nevergrad's ask/tell). A probe
batch is a plain record of small tensors, so it can be sliced into shards that are evaluated
independently (other processes, GPUs, machines) and their losses concatenated in probe order: the
combination is exact because every probe's loss depends on that probe alone.

Three kinds:

* :class:`CoordinateProbes` -- ``M`` single-coordinate perturbations (CGE, Sparse-CGE).
* :class:`DirectionProbes` -- ``M`` perturbations along random directions (RGE). Directions are never
  stored: direction ``k`` is regenerated from ``(seed, k)`` wherever it is needed (the MeZO trick),
  so a shard ships a few integers, not ``q x d`` floats.
* :class:`BlockProbes` -- ``M`` perturbations confined to *one* parameter tensor along explicit
  directions (structured read-outs such as the ZO-GraSP sketch); a staged model reuses the features
  before that tensor's stage, exactly as for coordinates.

**The protocol** every kind implements, and the only thing adapters rely on:

* ``len(probes)``, ``probes.slice(a, b)``, ``probes.select(rows)``, ``probes.shard(i, n)``;
* ``probes.tensor_groups()`` -- ``[(tensor name, probe rows), ...]`` when every probe moves one tensor
  (then a staged adapter reuses the features before that tensor's stage), or ``None``;
* ``probes.touched_bytes(params)`` -- bytes of the parameters one stacked set of a chunk holds;
* ``probes.stack(params)`` -- ``{name: (K, *shape)}`` copies of the touched tensors, perturbed;
* ``probes.linear_delta(layer, x, base_out, local)`` -- for a Conv2d/Linear stage that the probes
  move, the perturbed outputs ``(B, K, ...)`` from linearity in the weights, or ``None`` (no fast path);
* ``probes.channel_start(layer, x, base_out, local)`` -- the same when each probe changes one channel,
  as a :class:`~bbzo.adapters.channel.Channel` (channel-level reuse), or ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

__all__ = ["CoordinateProbes", "DirectionProbes", "BlockProbes", "Probes", "direction_seed", "make_direction",
           "concat_losses", "DISTRIBUTIONS"]

DISTRIBUTIONS = ("gaussian", "sphere", "tensor_sphere")


def _split(m: int, i: int, n: int) -> tuple[int, int]:
    if not 0 <= i < n:
        raise ValueError(f"shard index {i} out of range for {n} shards")
    return (m * i) // n, (m * (i + 1)) // n


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(frozen=True)
class CoordinateProbes:
    """``M`` single-coordinate perturbations.

    Probe ``m`` evaluates the model with ``params[names[pidx[m]]].flatten()[index[m]] += step[m]``.

    Attributes:
        names: Parameter names that ``pidx`` indexes into.
        pidx: ``(M,)`` int64 parameter index of each probe.
        index: ``(M,)`` int64 flat index inside that parameter.
        step: ``(M,)`` float64 signed perturbation size (``+mu`` or ``-mu``).
    """

    names: tuple[str, ...]
    pidx: torch.Tensor
    index: torch.Tensor
    step: torch.Tensor

    def __len__(self) -> int:
        return int(self.pidx.numel())

    def slice(self, start: int, stop: int) -> "CoordinateProbes":
        return replace(self, pidx=self.pidx[start:stop], index=self.index[start:stop], step=self.step[start:stop])

    def select(self, rows: torch.Tensor) -> "CoordinateProbes":
        return replace(self, pidx=self.pidx[rows], index=self.index[rows], step=self.step[rows])

    def shard(self, i: int, n: int) -> "CoordinateProbes":
        """Shard ``i`` of ``n`` (contiguous; concatenating all shards' losses restores probe order)."""
        return self.slice(*_split(len(self), i, n))

    def groups(self) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(param index, probe rows)`` for each parameter touched, in index order."""
        if len(self) == 0:
            return
        uniq = torch.unique(self.pidx)
        for p in uniq.tolist():
            yield p, (self.pidx == p).nonzero().flatten()

    # ------------------------------------------------------------------ protocol
    def tensor_groups(self) -> list[tuple[str, torch.Tensor]]:
        return [(self.names[p], rows) for p, rows in self.groups()]

    def touched_bytes(self, params: Mapping[str, torch.Tensor]) -> int:
        return max(_nbytes(params[self.names[p]]) for p in torch.unique(self.pidx).tolist())

    def stack(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``(K, *shape)`` copies of each parameter the K probes touch, each with its one coordinate moved."""
        k = len(self)
        stacked: dict[str, torch.Tensor] = {}
        rows_all = torch.arange(k)
        for p, rows in self.groups():
            name = self.names[p]
            base = params[name]
            s = base.reshape(1, -1).expand(k, -1).clone()
            idx = self.index[rows].to(base.device)
            r = rows_all[rows].to(base.device)
            s[r, idx] += self.step[rows].to(device=base.device, dtype=base.dtype)
            stacked[name] = s.view(k, *base.shape)
        return stacked

    def linear_delta(self, layer: nn.Module, x: torch.Tensor, base_out: torch.Tensor,
                     local: Mapping[str, str]) -> Optional[torch.Tensor]:
        from .adapters.linear_delta import coordinate_outputs

        locals_ = [local[self.names[p]] for p in self.pidx.tolist()]
        return coordinate_outputs(layer, x, base_out, locals_, self.index, self.step)

    def channel_start(self, layer: nn.Module, x: torch.Tensor, base_out: torch.Tensor, local: Mapping[str, str],
                      unfolded: Any = None, pool: Any = None) -> Any:
        from .adapters.channel import channel_start

        locals_ = [local[self.names[p]] for p in self.pidx.tolist()]
        return channel_start(layer, x, base_out, locals_, self.index, self.step, unfolded, pool)


def direction_seed(seed: int, k: int) -> int:
    """A 63-bit seed for direction ``k`` of a step seeded ``seed`` (independent streams per k)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFF, int(k)]).generate_state(1, np.uint64)
    return int(state[0]) & ((1 << 63) - 1)


def make_direction(
    seed: int,
    k: int,
    shapes: Sequence[torch.Size],
    distribution: str,
    dtype: torch.dtype = torch.float64,
) -> list[torch.Tensor]:
    """Direction ``u_k`` as one CPU tensor per parameter.

    ``gaussian``: ``u ~ N(0, I)``. ``sphere``: uniform on the sphere of radius ``sqrt(d)``; both have
    ``E[u u^T] = I``. ``tensor_sphere``: each tensor's block normalised to unit norm (DeepZero's ZO-GraSP
    directions; *not* isotropic: ``E[u u^T] = blockdiag(I / d_l)``).
    Generated in float64 on the CPU, so every device and dtype sees the same direction.
    """
    g = torch.Generator(device="cpu").manual_seed(direction_seed(seed, k))
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    flat = torch.randn(sum(sizes), generator=g, dtype=torch.float64)
    if distribution == "sphere":
        flat = flat * (flat.numel() ** 0.5 / flat.norm())
    elif distribution == "tensor_sphere":
        flat = torch.cat([t / t.norm() for t in flat.split(sizes)])
    elif distribution != "gaussian":
        raise ValueError(f"unknown direction distribution {distribution!r}; choose from {', '.join(DISTRIBUTIONS)}")
    return [t.view(s).to(dtype) for t, s in zip(flat.split(sizes), shapes)]


@dataclass(frozen=True)
class DirectionProbes:
    """``M`` perturbations ``theta + step[m] * u_{dirs[m]}`` along regenerated random directions.

    Attributes:
        names: Perturbed parameter names (all of them: a direction is dense).
        shapes: Their shapes.
        seed: Seed of this step's directions.
        dirs: ``(M,)`` int64 direction index of each probe.
        step: ``(M,)`` float64 signed step (``+mu`` / ``-mu``).
        distribution: ``"gaussian"``, ``"sphere"`` or ``"tensor_sphere"`` (see :func:`make_direction`).
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    seed: int
    dirs: torch.Tensor
    step: torch.Tensor
    distribution: str

    def __len__(self) -> int:
        return int(self.dirs.numel())

    def slice(self, start: int, stop: int) -> "DirectionProbes":
        return replace(self, dirs=self.dirs[start:stop], step=self.step[start:stop])

    def select(self, rows: torch.Tensor) -> "DirectionProbes":
        return replace(self, dirs=self.dirs[rows], step=self.step[rows])

    def shard(self, i: int, n: int) -> "DirectionProbes":
        return self.slice(*_split(len(self), i, n))

    def direction(self, k: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
        return make_direction(self.seed, k, self.shapes, self.distribution, dtype)

    # ------------------------------------------------------------------ protocol
    def tensor_groups(self) -> None:
        return None  # every probe moves every tensor

    def touched_bytes(self, params: Mapping[str, torch.Tensor]) -> int:
        return sum(_nbytes(p) for p in params.values())

    def stack(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``(K, *shape)`` parameter sets ``theta + step_k u_{dir_k}`` for the K probes."""
        k = len(self)
        out = {n: params[n].unsqueeze(0).repeat(k, *([1] * params[n].dim())) for n in self.names}
        for j in range(k):
            u = self.direction(int(self.dirs[j]))
            step = float(self.step[j])
            for n, un in zip(self.names, u):
                out[n][j].add_(un.to(device=out[n].device, dtype=out[n].dtype), alpha=step)
        return out

    def linear_delta(self, layer: nn.Module, x: torch.Tensor, base_out: torch.Tensor,
                     local: Mapping[str, str]) -> None:
        return None

    def channel_start(self, layer: nn.Module, x: torch.Tensor, base_out: torch.Tensor, local: Mapping[str, str],
                      unfolded: Any = None, pool: Any = None) -> None:
        return None  # a direction moves every channel


@dataclass(frozen=True)
class BlockProbes:
    """``M`` perturbations ``params[names[pidx]] += step[m] * dirs[m].view(shape)`` of one tensor.

    Attributes:
        names: Parameter names that ``pidx`` indexes into.
        pidx: Index of the one perturbed parameter.
        dirs: ``(M, n)`` float64 directions, ``n`` = that parameter's numel.
        step: ``(M,)`` float64 signed step.
    """

    names: tuple[str, ...]
    pidx: int
    dirs: torch.Tensor
    step: torch.Tensor

    def __post_init__(self) -> None:
        if self.dirs.dim() != 2 or self.step.shape != (self.dirs.shape[0],):
            raise ValueError(f"BlockProbes: dirs must be (M, n) and step (M,), got {tuple(self.dirs.shape)} "
                             f"and {tuple(self.step.shape)}")

    @property
    def name(self) -> str:
        return self.names[self.pidx]

    def __len__(self) -> int:
        return int(self.dirs.shape[0])

    def slice(self, start: int, stop: int) -> "BlockProbes":
        return replace(self, dirs=self.dirs[start:stop], step=self.step[start:stop])

    def select(self, rows: torch.Tensor) -> "BlockProbes":
        return replace(self, dirs=self.dirs[rows], step=self.step[rows])

    def shard(self, i: int, n: int) -> "BlockProbes":
        return self.slice(*_split(len(self), i, n))

    # ------------------------------------------------------------------ protocol
    def tensor_groups(self) -> list[tuple[str, torch.Tensor]]:
        return [(self.name, torch.arange(len(self)))]

    def touched_bytes(self, params: Mapping[str, torch.Tensor]) -> int:
        return _nbytes(params[self.name])

    def stack(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``(K, *shape)`` copies of the one perturbed tensor: ``theta + step_k * dir_k``."""
        base = params[self.name]
        d = self.dirs.to(device=base.device, dtype=base.dtype) * self.step.to(device=base.device, dtype=base.dtype)[:, None]
        return {self.name: (base.reshape(1, -1) + d).view(len(self), *base.shape)}

    def linear_delta(self, layer: nn.Module, x: torch.Tensor, base_out: torch.Tensor,
                     local: Mapping[str, str]) -> Optional[torch.Tensor]:
        from .adapters.linear_delta import block_outputs

        return block_outputs(layer, x, base_out, local[self.name], self.dirs, self.step)

    def channel_start(self, layer: nn.Module, x: torch.Tensor, base_out: torch.Tensor, local: Mapping[str, str],
                      unfolded: Any = None, pool: Any = None) -> None:
        return None  # a dense direction in one tensor moves every channel of its layer


Probes = Union[CoordinateProbes, DirectionProbes, BlockProbes]


def concat_losses(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Losses of consecutive shards -> losses of the whole probe batch (exact: a concatenation)."""
    return torch.cat(list(parts)) if parts else torch.zeros(0, dtype=torch.float64)
