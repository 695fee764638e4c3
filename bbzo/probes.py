"""Probes: the perturbations an estimator asks to have evaluated. Plain data: small tensors and ints.

An estimator *asks* for a batch of probes and is *told* their losses (nevergrad's ask/tell). A probe batch
can be sliced into shards that are evaluated independently (other processes, GPUs, machines) and their
losses put back in probe order: the combination is exact because every probe's loss depends on that probe
alone. The adapters (:mod:`bbzo.adapters`) decide *how* a kind of probe is evaluated fastest; nothing here
knows about them.

Four kinds, each perturbing one space:

* :class:`CoordinateProbes` -- ``M`` single-coordinate perturbations of the parameters (CGE, Sparse-CGE).
* :class:`DirectionProbes` -- ``M`` perturbations of the parameters along random directions (RGE).
  Directions are never stored: direction ``k`` is regenerated from ``(seed, k)`` wherever it is needed
  (the MeZO trick), so a shard ships a few integers, not ``q x d`` floats.
* :class:`BlockProbes` -- ``M`` perturbations confined to *one* parameter tensor along explicit directions
  (structured read-outs such as the ZO-GraSP sketch).
* :class:`OutputProbes` -- ``M`` perturbations of the *model's outputs* for every sample at once (the
  chain-rule estimators ``oracle_cge`` / ``oracle_rge``: finite differences only where the black box is).

**The protocol** every kind implements: ``len(probes)``, ``probes.slice(a, b)``, ``probes.select(rows)``,
``probes.delta`` (``(M,)`` float64 signed perturbation sizes), and for the parameter kinds
``probes.tensor_groups()`` (``[(tensor name, probe rows), ...]`` when every probe moves one tensor, else
``None``), ``probes.touched_bytes(params)`` and ``probes.stack(params)`` (``{name: (K, *shape)}`` perturbed
copies of the touched tensors).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["CoordinateProbes", "DirectionProbes", "BlockProbes", "OutputProbes", "Probes", "direction_seed",
           "make_direction", "make_directions", "DISTRIBUTIONS", "OUTPUT_KINDS"]

DISTRIBUTIONS = ("gaussian", "sphere", "tensor_sphere")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(frozen=True)
class CoordinateProbes:
    """``M`` single-coordinate perturbations.

    Probe ``m`` evaluates the model with ``params[names[pidx[m]]].flatten()[index[m]] += delta[m]``.

    Attributes:
        names: Parameter names that ``pidx`` indexes into.
        pidx: ``(M,)`` int64 parameter index of each probe.
        index: ``(M,)`` int64 flat index inside that parameter.
        delta: ``(M,)`` float64 signed perturbation size (``+mu`` or ``-mu``).
    """

    names: tuple[str, ...]
    pidx: torch.Tensor
    index: torch.Tensor
    delta: torch.Tensor

    def __len__(self) -> int:
        return int(self.pidx.numel())

    def slice(self, start: int, stop: int) -> "CoordinateProbes":
        return replace(self, pidx=self.pidx[start:stop], index=self.index[start:stop], delta=self.delta[start:stop])

    def select(self, rows: torch.Tensor) -> "CoordinateProbes":
        return replace(self, pidx=self.pidx[rows], index=self.index[rows], delta=self.delta[rows])


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
        """Bytes of the largest tensor a probe of this batch *may* move (any of ``names``): the same for every
        sub-batch, so a sub-batch is chunked as the whole batch is (bitwise-equal shards)."""
        return max(_nbytes(params[n]) for n in self.names)

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
            s[r, idx] += self.delta[rows].to(device=base.device, dtype=base.dtype)
            stacked[name] = s.view(k, *base.shape)
        return stacked



def direction_seed(seed: int, k: int) -> int:
    """A 63-bit seed for direction ``k`` of a step seeded ``seed`` (independent streams per k)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFF, int(k)]).generate_state(1, np.uint64)
    return int(state[0]) & ((1 << 63) - 1)


def _direction_row(seed: int, k: int, sizes: Sequence[int], distribution: str, out: torch.Tensor) -> None:
    """Direction ``u_k`` into the float64 row ``out (d,)`` (one generator per direction: ``(seed, k)`` alone decides it)."""
    g = torch.Generator(device="cpu").manual_seed(direction_seed(seed, k))
    torch.randn(out.shape, generator=g, dtype=torch.float64, out=out)
    if distribution == "sphere":
        out.mul_(out.numel() ** 0.5 / out.norm())
    elif distribution == "tensor_sphere":
        for t in out.split(list(sizes)):
            t.div_(t.norm())
    elif distribution != "gaussian":
        raise ValueError(f"unknown direction distribution {distribution!r}; choose from {', '.join(DISTRIBUTIONS)}")


def make_directions(seed: int, ks: Sequence[int], shapes: Sequence[torch.Size], distribution: str) -> torch.Tensor:
    """Directions ``u_k`` for every ``k`` in ``ks`` as one ``(K, d)`` float64 CPU matrix, parameters concatenated
    in order (each flattened).

    Row ``j`` is :func:`make_direction` ``(seed, ks[j])`` bitwise: each row is drawn by its own generator straight
    into the matrix, so an estimator that regenerates one direction sees the very numbers a batch evaluated.
    """
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    ks = [int(k) for k in ks]
    out = torch.empty(len(ks), sum(sizes), dtype=torch.float64)
    for j, k in enumerate(ks):
        _direction_row(seed, k, sizes, distribution, out[j])
    return out


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
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    flat = make_directions(seed, [k], shapes, distribution)[0]
    return [t.view(s).to(dtype) for t, s in zip(flat.split(sizes), shapes)]


@dataclass(frozen=True)
class DirectionProbes:
    """``M`` perturbations ``theta + delta[m] * u_{dirs[m]}`` along regenerated random directions.

    Attributes:
        names: Perturbed parameter names (all of them: a direction is dense).
        shapes: Their shapes.
        seed: Seed of this step's directions.
        dirs: ``(M,)`` int64 direction index of each probe.
        delta: ``(M,)`` float64 signed step (``+mu`` / ``-mu``).
        distribution: ``"gaussian"``, ``"sphere"`` or ``"tensor_sphere"`` (see :func:`make_direction`).
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    seed: int
    dirs: torch.Tensor
    delta: torch.Tensor
    distribution: str

    def __len__(self) -> int:
        return int(self.dirs.numel())

    def slice(self, start: int, stop: int) -> "DirectionProbes":
        return replace(self, dirs=self.dirs[start:stop], delta=self.delta[start:stop])

    def select(self, rows: torch.Tensor) -> "DirectionProbes":
        return replace(self, dirs=self.dirs[rows], delta=self.delta[rows])


    def direction(self, k: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
        return make_direction(self.seed, k, self.shapes, self.distribution, dtype)

    # ------------------------------------------------------------------ protocol
    def tensor_groups(self) -> None:
        return None  # every probe moves every tensor

    def touched_bytes(self, params: Mapping[str, torch.Tensor]) -> int:
        return sum(_nbytes(p) for p in params.values())

    def matrix(self) -> torch.Tensor:
        """``(M, d)`` float64: the probes' directions ``u_{dirs[m]}`` (parameters concatenated, each flattened)."""
        return make_directions(self.seed, self.dirs.tolist(), self.shapes, self.distribution)

    def stack(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``(K, *shape)`` parameter sets ``theta + delta_k u_{dir_k}`` for the K probes.

        The directions are drawn into one ``(K, d)`` matrix and scaled by ``delta`` at once; each parameter is
        then one broadcast add (no per-direction loop over the tensors). ``delta_k u_k`` is formed in float64 and
        rounded to the parameter's dtype before the add.
        """
        k = len(self)
        steps = self.matrix().mul_(self.delta.to(torch.float64)[:, None])  # (K, d)
        out: dict[str, torch.Tensor] = {}
        start = 0
        for n, shape in zip(self.names, self.shapes):
            base = params[n]
            size = base.numel()
            if tuple(base.shape) != tuple(shape):
                raise ValueError(f"DirectionProbes: parameter {n!r} has shape {tuple(base.shape)}, the probes were "
                                 f"made for {tuple(shape)}")
            step = steps[:, start:start + size].to(device=base.device, dtype=base.dtype)
            out[n] = (step + base.reshape(1, -1)).view(k, *base.shape)
            start += size
        return out


@dataclass(frozen=True)
class BlockProbes:
    """``M`` perturbations ``params[names[pidx]] += delta[m] * dirs[m].view(shape)`` of one tensor.

    Attributes:
        names: Parameter names that ``pidx`` indexes into.
        pidx: Index of the one perturbed parameter.
        dirs: ``(M, n)`` float64 directions, ``n`` = that parameter's numel.
        delta: ``(M,)`` float64 signed step.
    """

    names: tuple[str, ...]
    pidx: int
    dirs: torch.Tensor
    delta: torch.Tensor

    def __post_init__(self) -> None:
        if self.dirs.dim() != 2 or self.delta.shape != (self.dirs.shape[0],):
            raise ValueError(f"BlockProbes: dirs must be (M, n) and delta (M,), got {tuple(self.dirs.shape)} "
                             f"and {tuple(self.delta.shape)}")

    @property
    def name(self) -> str:
        return self.names[self.pidx]

    def __len__(self) -> int:
        return int(self.dirs.shape[0])

    def slice(self, start: int, stop: int) -> "BlockProbes":
        return replace(self, dirs=self.dirs[start:stop], delta=self.delta[start:stop])

    def select(self, rows: torch.Tensor) -> "BlockProbes":
        return replace(self, dirs=self.dirs[rows], delta=self.delta[rows])


    # ------------------------------------------------------------------ protocol
    def tensor_groups(self) -> list[tuple[str, torch.Tensor]]:
        return [(self.name, torch.arange(len(self)))]

    def touched_bytes(self, params: Mapping[str, torch.Tensor]) -> int:
        return _nbytes(params[self.name])

    def stack(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``(K, *shape)`` copies of the one perturbed tensor: ``theta + delta_k * dir_k``."""
        base = params[self.name]
        d = self.dirs.to(device=base.device, dtype=base.dtype) * self.delta.to(device=base.device, dtype=base.dtype)[:, None]
        return {self.name: (base.reshape(1, -1) + d).view(len(self), *base.shape)}




OUTPUT_KINDS = ("coordinate", "gaussian")


@dataclass(frozen=True)
class OutputProbes:
    """``M`` perturbations of the model's outputs ``(B, width)`` (flattened per sample), all samples at once.

    For a white-box model in front of a black box, finite differences are only needed where the black box
    is: probe ``m`` evaluates the objective at ``outputs + delta[m] * U_m`` with the model untouched.

    * ``kind="coordinate"``: ``U_m`` moves output coordinate ``index[m]`` of every sample (``oracle_cge``);
      per-sample losses give every sample's partial derivative at once.
    * ``kind="gaussian"``: ``U_m`` is a ``(B, width)`` standard Gaussian regenerated from ``(seed, index[m])``
      -- an independent direction per sample (``oracle_rge``).

    Attributes:
        kind: ``"coordinate"`` or ``"gaussian"``.
        index: ``(M,)`` int64 output coordinate (coordinate) or direction number (gaussian).
        delta: ``(M,)`` float64 signed step.
        width: The model's output values per sample (the perturbed space's dimension).
        seed: Seed of the Gaussian directions of this step.
    """

    kind: str
    index: torch.Tensor
    delta: torch.Tensor
    width: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in OUTPUT_KINDS:
            raise ValueError(f"OutputProbes: kind must be one of {OUTPUT_KINDS}, got {self.kind!r}")

    def __len__(self) -> int:
        return int(self.index.numel())

    def slice(self, start: int, stop: int) -> "OutputProbes":
        return replace(self, index=self.index[start:stop], delta=self.delta[start:stop])

    def select(self, rows: torch.Tensor) -> "OutputProbes":
        return replace(self, index=self.index[rows], delta=self.delta[rows])

    def direction(self, k: int, batch: int) -> torch.Tensor:
        """``U`` of direction ``k``: ``(B, width)`` float64 (a one-hot column for coordinates)."""
        width = self.width
        if self.kind == "coordinate":
            u = torch.zeros(batch, width, dtype=torch.float64)
            u[:, int(k)] = 1.0
            return u
        g = torch.Generator(device="cpu").manual_seed(direction_seed(self.seed, int(k)))
        return torch.randn(batch, width, generator=g, dtype=torch.float64)

    def perturbations(self, batch: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
        """``(M, B, width)``: ``delta[m] * U_m`` for every probe, in ``dtype`` on ``device``."""
        m, width = len(self), self.width
        if self.kind == "coordinate":
            if m and int(self.index.max()) >= width:
                raise ValueError(f"output coordinate {int(self.index.max())} out of range for width {width}")
            out = torch.zeros(m, batch, width, dtype=dtype, device=device)
            out[torch.arange(m, device=device), :, self.index.to(device)] = self.delta.to(device=device, dtype=dtype)[:, None]
            return out
        dirs = [self.direction(int(k), batch) for k in self.index.tolist()]
        stacked = torch.stack(dirs) if dirs else torch.zeros(0, batch, width, dtype=torch.float64)
        return (stacked * self.delta.view(-1, 1, 1)).to(device=device, dtype=dtype)


Probes = Union[CoordinateProbes, DirectionProbes, BlockProbes, OutputProbes]
