"""PhiFlow's incompressible Navier-Stokes solver for the Kármán vortex street, as a black box.

The unsteady wake flow of Um et al. 2020 ("Solver-in-the-Loop") used by DeepZero §6.2 / Appendix H:
domain ``[0, 100] x [0, 200]`` (x by y, abstract units, 100 = the unit width), open boundaries
(zero-gradient velocity), inflow ``v = 1`` through the bottom two face rows and the left/right-most
face columns, a cylinder of radius 10 at (50, 50), ``dt = 1``. One step is

1. explicit diffusion with viscosity ``nu = 1e4 / re_param``, ``re_param = 1638.4 * Re`` (the
   original's ``--re`` convention; the *same* physical viscosity on every grid, see
   the README's ZO-SOL decisions for the PhiFlow-2 ports' resolution-dependent mistake),
2. the inflow overwrite,
3. semi-Lagrangian self-advection,
4. pressure projection around the obstacle (CG, tolerance 1e-5).

**Tensor layout.** bbzo passes states as torch ``(N, 2, H, W)`` with ``H = ny`` rows (y, upwards) and
``W = nx`` columns (x); channel 0 is ``u`` (x-velocity), channel 1 is ``v`` (y-velocity). A staggered
grid with zero-gradient boundaries stores ``u`` on ``(nx + 1) x ny`` faces and ``v`` on
``nx x (ny + 1)``: the layout keeps the first ``nx`` / ``ny`` faces and drops the last one (as the
original network input does). Going back, the dropped face is rebuilt by zero-gradient extrapolation
(a copy of its neighbour), so ``nchw -> staggered -> nchw`` is exact.

:class:`KarmanSolver` is the solver itself (white-box PhiFlow code, differentiable on the torch
backend: the FO-SOL baseline uses it with autograd, and *says so*). :class:`KarmanOracle` wraps it as
a query-only :class:`~bbzo.oracle.Oracle`: torch in, torch out, under ``no_grad``, inputs that require
grad refused, NaN answers rejected, rows counted. ``backend="numpy"`` runs PhiFlow on numpy, so not
even a stray graph can exist.
"""

from __future__ import annotations

import functools
import math as _math
import threading
import warnings
from dataclasses import asdict, dataclass, fields
from types import SimpleNamespace
from typing import Any, Optional, Sequence

import numpy as np
import torch

from bbzo.errors import ConfigError, OracleError, ShapeError
from bbzo.oracle import Oracle

__all__ = ["KarmanSetup", "KarmanSolver", "KarmanOracle", "phi", "RE_SCALE"]

#: Paper Re = re_param / RE_SCALE (the original's command-line "--re" value); nu = 1e4 / re_param.
RE_SCALE = 1638.4
_lock = threading.Lock()
_PHI: Optional[SimpleNamespace] = None


def phi() -> SimpleNamespace:
    """PhiFlow, imported once and lazily (2-5 s), with its deprecation noise filtered.

    Modules are imported by name, never ``from phi.flow import *`` (it shadows builtins like ``round``).
    """
    global _PHI
    with _lock:
        if _PHI is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from phi import field as fld
                from phi import geom
                from phi.field import StaggeredGrid
                from phi.physics import advect, diffuse, fluid
                from phi.physics._boundaries import Obstacle
                from phiml import math
                from phiml.backend import NUMPY
                from phiml.backend.torch import TORCH
                from phiml.math import batch, dual, extrapolation, spatial
            _PHI = SimpleNamespace(math=math, field=fld, geom=geom, StaggeredGrid=StaggeredGrid, advect=advect,
                                   diffuse=diffuse, fluid=fluid, Obstacle=Obstacle, NUMPY=NUMPY, TORCH=TORCH,
                                   batch=batch, dual=dual, spatial=spatial, extrapolation=extrapolation)
    return _PHI


@dataclass(frozen=True)
class KarmanSetup:
    """Grid and physics of one resolution (defaults: the low-fidelity 32 x 64 grid of the paper)."""

    nx: int = 32
    ny: int = 64
    width: float = 100.0
    height: float = 200.0
    dt: float = 1.0
    cylinder: tuple[float, float] = (50.0, 50.0)
    radius: float = 10.0
    cg_tol: float = 1e-5
    cg_max_iter: int = 2000

    def __post_init__(self) -> None:
        if self.nx < 4 or self.ny < 4:
            raise ConfigError(f"grid {self.nx}x{self.ny} is too small; use at least 4x4 cells.")
        if not (self.dt > 0 and self.radius > 0 and self.width > 0 and self.height > 0):
            raise ConfigError("dt, radius, width and height must be > 0.")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Per-state NCHW shape ``(2, ny, nx)``."""
        return (2, self.ny, self.nx)

    def scaled(self, factor: int) -> "KarmanSetup":
        """The same flow on a grid ``factor`` times finer (physics unchanged)."""
        return KarmanSetup(**{**asdict(self), "nx": self.nx * factor, "ny": self.ny * factor})

    @staticmethod
    def viscosity(re: Any) -> Any:
        """Kinematic viscosity for paper-Re ``re``: ``1e4 / (1638.4 * Re)``, resolution-independent."""
        return 1e4 / (RE_SCALE * re)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


class KarmanSolver:
    """The low- or high-fidelity PhiFlow solver, batched over states (and their Re).

    Args:
        setup: Grid and physics.
        backend: ``"torch"`` (fast, jit-compiled, differentiable when ``jit=False``) or ``"numpy"``
            (no graph can exist; slower at large batches).
        jit: Trace the step with ``phiml.math.jit_compile`` (torch only). Every new batch size
            re-traces once (1-6 s); :class:`KarmanOracle` pads batches to a few fixed sizes.
        device: Torch device of the states the solver returns.
    """

    def __init__(self, setup: KarmanSetup = KarmanSetup(), *, backend: str = "torch", jit: bool = True,
                 device: Any = "cpu") -> None:
        if backend not in ("torch", "numpy"):
            raise ConfigError(f"backend must be 'torch' or 'numpy', got {backend!r}.")
        self.setup, self.backend, self.device = setup, backend, torch.device(device)
        self.jit = bool(jit) and backend == "torch"
        p = phi()
        s = setup
        self._be = p.TORCH if backend == "torch" else p.NUMPY
        with self._be:
            self.bounds = p.geom.Box(x=s.width, y=s.height)
            self.obstacle = p.Obstacle(p.geom.Sphere(x=s.cylinder[0], y=s.cylinder[1], radius=s.radius))
            # inflow overwrite of the y-velocity faces (nx, ny + 1): bottom two rows, outer columns
            mask = np.zeros((s.nx, s.ny + 1), np.float32)
            mask[:, :2] = 1.0
            mask[0, :] = 1.0
            mask[-1, :] = 1.0
            self.mask = p.math.tensor(self._native(mask), p.spatial("x,y"))
            self.solve = p.math.Solve("auto", s.cg_tol, s.cg_tol, max_iterations=s.cg_max_iter)
        self._step_jit = p.math.jit_compile(self._phi_step) if self.jit else None
        self._phi_device: Any = None  # PhiML's ComputeDevice for self.device, resolved on first use

    # ------------------------------------------------------------------ conversions
    def _native(self, a: Any) -> Any:
        if self.backend == "torch":
            return torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a, device=self.device)
        return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)

    def to_grid(self, states: torch.Tensor) -> Any:
        """``(N, 2, ny, nx)`` torch -> PhiFlow ``StaggeredGrid`` with batch dim ``b`` (last faces rebuilt)."""
        p = phi()
        self.check_states(states)
        if self.backend == "numpy":
            states = states.detach().cpu()
        u = torch.cat([states[:, 0], states[:, 0, :, -1:]], dim=2)  # (N, ny, nx + 1)
        v = torch.cat([states[:, 1], states[:, 1, -1:, :]], dim=1)  # (N, ny + 1, nx)
        with self._be:
            # PhiFlow orders spatial dims as the grid's resolution (x, y)
            ut = p.math.tensor(self._native(u.transpose(1, 2)), p.batch("b"), p.spatial("x,y"))
            vt = p.math.tensor(self._native(v.transpose(1, 2)), p.batch("b"), p.spatial("x,y"))
            values = p.math.stack({"x": ut, "y": vt}, p.dual(vector="x,y"))
            return p.StaggeredGrid(values, p.extrapolation.ZERO_GRADIENT, bounds=self.bounds)

    def from_grid(self, grid: Any) -> torch.Tensor:
        """PhiFlow ``StaggeredGrid`` (batch dim ``b``) -> ``(N, 2, ny, nx)`` torch (last faces dropped)."""
        u = grid.values[{"~vector": "x"}].x[:-1]
        v = grid.values[{"~vector": "y"}].y[:-1]
        out = [t.native(["b", "y", "x"]) for t in (u, v)]
        if self.backend == "numpy":
            out = [torch.from_numpy(np.ascontiguousarray(o)) for o in out]
        return torch.stack(out, dim=1).to(self.device)

    def check_states(self, states: Any) -> None:
        s = self.setup
        if not isinstance(states, torch.Tensor) or states.dim() != 4 or tuple(states.shape[1:]) != s.shape:
            shape = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
            raise ShapeError(
                f"Kármán states must be a torch tensor of shape (N, 2, {s.ny}, {s.nx}) = (batch, [u, v], y, x) "
                f"for the {s.nx}x{s.ny} grid; got {shape}."
            )

    def _nu(self, re: torch.Tensor) -> Any:
        p = phi()
        with self._be:
            return p.math.tensor(self._native(self.setup.viscosity(re.detach().double()).float()), p.batch("b"))

    # ------------------------------------------------------------------ physics
    def _phi_step(self, v: Any, nu: Any) -> Any:
        p, s = phi(), self.setup
        v = p.diffuse.explicit(v, nu, s.dt)
        vy = v.values[{"~vector": "y"}]
        vy = vy * (1 - self.mask) + self.mask
        values = p.math.stack({"x": v.values[{"~vector": "x"}], "y": vy}, p.dual(vector="x,y"))
        v = v.with_values(values)
        v = p.advect.semi_lagrangian(v, v, s.dt)
        v, _ = p.fluid.make_incompressible(v, self.obstacle, self.solve)
        return v

    def step_grid(self, grid: Any, re: torch.Tensor, n: int = 1) -> Any:
        """``n`` solver steps on a PhiFlow grid (used for data generation at any resolution)."""
        nu = self._nu(re)
        f = self._step_jit or self._phi_step
        self._use_device()
        with warnings.catch_warnings(), self._be:
            warnings.simplefilter("ignore")
            for _ in range(n):
                grid = f(grid, nu)
                if self.jit:
                    self._check_projection(grid)
        return grid

    def _check_projection(self, grid: Any) -> None:
        """A traced step skips PhiML's convergence check, so check its result: after a converged
        projection the *median* cell |div v| is far below the CG tolerance (measured 1-3e-7 at tol 1e-5
        on 16x32 and 32x64; 1e-4 to 3e-3 after 3-20 CG iterations; the mean is dominated by cells at
        the obstacle). Rows above ``cg_tol`` raise instead of returning a wrong state."""
        s = self.setup
        u = torch.as_tensor(grid.values[{"~vector": "x"}].native(["b", "x", "y"]))  # (N, nx + 1, ny)
        v = torch.as_tensor(grid.values[{"~vector": "y"}].native(["b", "x", "y"]))  # (N, nx, ny + 1)
        div = ((u[:, 1:] - u[:, :-1]) * (s.nx / s.width) + (v[:, :, 1:] - v[:, :, :-1]) * (s.ny / s.height)).abs()
        med = div.flatten(1).median(dim=1).values
        bad = ~(med <= self.setup.cg_tol)
        if bool(bad.any()):
            raise OracleError(
                f"PhiFlow solver {self.setup.nx}x{self.setup.ny}: the pressure projection did not converge for "
                f"{int(bad.sum())} of {med.numel()} states (median |div v| up to {float(med.max()):.2e}, CG "
                f"tolerance {self.setup.cg_tol:g}, at most {self.setup.cg_max_iter} iterations). The states are "
                "outside the solver's range (lower the learning rate / mu) or cg_max_iter is too small.")

    def _use_device(self) -> None:
        """PhiML creates its own tensors on the torch backend's default device: make that ours."""
        if self.backend != "torch":
            return
        p = phi()
        if self._phi_device is None:
            want = "GPU" if self.device.type == "cuda" else "CPU"
            devs = p.TORCH.list_devices(want)
            if not devs:
                raise ConfigError(f"no {want} visible to PhiFlow for device {self.device}.")
            self._phi_device = devs[self.device.index or 0] if self.device.type == "cuda" else devs[0]
        if p.TORCH.get_default_device() is not self._phi_device:
            p.TORCH.set_default_device(self._phi_device)

    def step(self, states: torch.Tensor, re: torch.Tensor, n: int = 1) -> torch.Tensor:
        """``n`` steps of ``(N, 2, ny, nx)`` states at per-row Reynolds numbers ``re`` ``(N,)``.

        On the torch backend without jit this is differentiable (the FO-SOL baseline); bbzo's
        zeroth-order path only ever reaches it through :class:`KarmanOracle`.
        """
        re = torch.as_tensor(re, dtype=torch.float64).reshape(-1)
        if re.shape[0] != states.shape[0]:
            raise ShapeError(f"re must have one value per state: {states.shape[0]} states, {re.shape[0]} values.")
        return self.from_grid(self.step_grid(self.to_grid(states), re, n))

    def initial_state(self, re: Sequence[float], poke: float = 1.0) -> torch.Tensor:
        """Start of a simulation: ``v = 1`` everywhere plus a sideways poke ``u = poke`` in a patch
        behind the cylinder (breaks the symmetry so the wake starts to shed), made divergence-free.

        Returns ``(len(re), 2, ny, nx)``.
        """
        s = self.setup
        n = len(re)
        x = (torch.arange(s.nx) + 0.5) * s.width / s.nx
        y = (torch.arange(s.ny) + 0.5) * s.height / s.ny
        cx, cy = s.cylinder
        patch = ((x[None, :] - cx).abs() <= 0.5 * s.radius) & (y[:, None] >= cy + s.radius) & \
                (y[:, None] <= cy + 2.5 * s.radius)
        st = torch.zeros(n, 2, s.ny, s.nx)
        st[:, 1] = 1.0
        st[:, 0] = poke * patch.float()
        p = phi()
        with warnings.catch_warnings(), self._be:
            warnings.simplefilter("ignore")
            g, _ = p.fluid.make_incompressible(self.to_grid(st), self.obstacle, self.solve)
        return self.from_grid(g)


def downsample_states(states: torch.Tensor, setup: KarmanSetup, factor: int) -> torch.Tensor:
    """Downsample ``(N, 2, ny, nx)`` states by ``factor`` (a power of 2) with PhiFlow's staggered
    face-average restriction (``field.downsample2x``, applied log2(factor) times)."""
    if factor < 1 or factor & (factor - 1):
        raise ConfigError(f"the downsampling factor must be a power of 2, got {factor}.")
    if factor == 1:
        return states.clone()
    p = phi()
    g = _numpy_solver(setup).to_grid(states.detach().cpu())
    with warnings.catch_warnings(), p.NUMPY:
        warnings.simplefilter("ignore")
        for _ in range(int(_math.log2(factor))):
            g = p.field.downsample2x(g)
    low = KarmanSetup(**{**asdict(setup), "nx": setup.nx // factor, "ny": setup.ny // factor})
    return _numpy_solver(low).from_grid(g).to(states.device)


@functools.lru_cache(maxsize=8)
def _numpy_solver(setup: KarmanSetup) -> KarmanSolver:
    """A numpy-backed solver used only for grid conversions (built once per setup, not once per frame)."""
    return KarmanSolver(setup, backend="numpy", jit=False)


class KarmanOracle(Oracle):
    """One step of the low-fidelity solver as a query-only oracle: ``query(states, re) -> next states``.

    Args:
        setup: Grid and physics (default 32 x 64).
        backend: ``"torch"`` or ``"numpy"`` (see :class:`KarmanSolver`).
        jit: Jit-compile the step (torch backend).
        min_bucket, max_batch: Batches are padded (with copies of row 0, not counted as queries) up to
            the next power of two, at least ``min_bucket``, so the jit traces only a few batch sizes.
            Calls above ``max_batch`` rows are split (by the :class:`~bbzo.oracle.Oracle` base).
        device: Where the answers go.
        **kw: :class:`~bbzo.oracle.Oracle` options (``name``, ``max_rows``, ``max_calls``).
    """

    def __init__(self, setup: KarmanSetup = KarmanSetup(), *, backend: str = "torch", jit: bool = True,
                 min_bucket: int = 8, max_batch: int = 512, device: Any = "cpu", **kw: Any) -> None:
        kw.setdefault("name", f"phiflow-karman-{setup.nx}x{setup.ny}({backend})")
        super().__init__(input_shape=setup.shape, output_shape=setup.shape, max_batch=int(max_batch), **kw)
        self.solver = KarmanSolver(setup, backend=backend, jit=jit, device=device)
        self.min_bucket = int(min_bucket)
        self.pad_rows = 0

    @property
    def setup(self) -> KarmanSetup:
        return self.solver.setup

    def _bucket(self, n: int) -> int:
        if not self.solver.jit:
            return n
        return min(self.max_batch, max(self.min_bucket, 1 << max(0, (n - 1).bit_length())))

    def _query(self, inputs: torch.Tensor, re: Optional[torch.Tensor] = None) -> torch.Tensor:
        if re is None:
            raise OracleError(f"{self.name}: query(states, re) needs one Reynolds number per state.")
        re = re.detach().to(torch.float64).reshape(-1)
        if re.shape[0] != inputs.shape[0] or not bool(torch.isfinite(re).all()) or bool((re <= 0).any()):
            raise OracleError(
                f"{self.name}: re must hold {inputs.shape[0]} finite positive Reynolds numbers (one per state), "
                f"got shape {tuple(re.shape)}."
            )
        bad = ~torch.isfinite(inputs.reshape(inputs.shape[0], -1)).all(dim=1)
        if bool(bad.any()):
            raise OracleError(
                f"{self.name}: {int(bad.sum())} of {inputs.shape[0]} input states contain NaN/inf (first: row "
                f"{int(bad.nonzero()[0])}). The rollout diverged before reaching the solver: lower the "
                "learning rate / perturbation mu, or check the corrector's output scale."
            )
        x, r = inputs, re  # at most max_batch rows: the base class splits larger calls
        n, b = x.shape[0], self._bucket(x.shape[0])
        if b > n:
            x = torch.cat([x, x[:1].expand(b - n, *x.shape[1:])])
            r = torch.cat([r, r[:1].expand(b - n)])
            self.pad_rows += b - n
        try:
            return self.solver.step(x, r)[:n].to(inputs.device)
        except phi().math.ConvergenceException as e:
            raise OracleError(
                f"{self.name}: the pressure solve failed on a batch of {n} rows ({type(e).__name__}: "
                f"{str(e)[:160]}). The states are outside the range the solver can handle (velocities of order 1 "
                "are expected): a corrector or perturbation produced them; lower the learning rate or mu."
            ) from e
