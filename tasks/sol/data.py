"""High-fidelity reference data for ZO-SOL: generated once per setting, cached, reused.

``generate(settings, cache_dir)`` runs the Kármán flow on the fine grid (``factor`` times the solver's
grid, 2 -> 64 x 128 by default) for every training and test Re *in one PhiFlow batch* (one viscosity
per entry), discards ``warmup`` steps (the wake must shed first), records ``frames`` frames,
downsamples them to the solver's grid with PhiFlow's staggered restriction and writes

* ``karman_<hash>.npz``: ``train`` ``(R_train, T, 2, ny, nx)`` float32, ``test`` ``(R_test, T, 2, ny, nx)``,
  ``train_re`` / ``test_re``;
* ``karman_<hash>.json``: the settings, the wall time and a wake-shedding check.

The hash covers every setting that changes the data, so a different setting never reads stale data
and the same setting is never generated twice. Files are written atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from bbzo.checkpoint import atomic_write_bytes
from bbzo.errors import ConfigError
from bbzo.oracles.karman import KarmanSetup, KarmanSolver, downsample_states

__all__ = ["DataSettings", "SolData", "generate", "load", "RolloutBatches", "TRAIN_RE", "TEST_RE"]

TRAIN_RE = (97.7, 195.3, 390.6, 781.3, 1562.5, 3125.0)
TEST_RE = (146.5, 293.0, 585.9, 1171.9, 2343.8)
FORMAT = "bbzo-sol-data/1"


@dataclass(frozen=True)
class DataSettings:
    """Everything that determines the reference data."""

    nx: int = 32
    ny: int = 64
    factor: int = 2
    train_re: tuple[float, ...] = TRAIN_RE
    test_re: tuple[float, ...] = TEST_RE
    warmup: int = 1000
    frames: int = 500
    poke: float = 1.0
    backend: str = "torch"

    def __post_init__(self) -> None:
        if self.factor < 1 or self.factor & (self.factor - 1):
            raise ConfigError(f"factor must be a power of 2 (high-res = factor x low-res), got {self.factor}.")
        if self.frames < 2 or self.warmup < 0:
            raise ConfigError(f"need frames >= 2 and warmup >= 0, got frames={self.frames}, warmup={self.warmup}.")
        if not self.train_re or not self.test_re:
            raise ConfigError("train_re and test_re must each name at least one Reynolds number.")
        if any(not r > 0 for r in (*self.train_re, *self.test_re)):
            raise ConfigError("Reynolds numbers must be > 0.")

    @property
    def low(self) -> KarmanSetup:
        return KarmanSetup(nx=self.nx, ny=self.ny)

    @property
    def high(self) -> KarmanSetup:
        return self.low.scaled(self.factor)

    def key(self) -> str:
        d = asdict(self)  # backend included: torch's CG and numpy's adaptive CG round differently
        d["physics"] = self.low.to_dict()
        d["format"] = FORMAT
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class SolData:
    settings: DataSettings
    train: torch.Tensor  # (R_train, T, 2, ny, nx)
    test: torch.Tensor  # (R_test, T, 2, ny, nx)
    train_re: torch.Tensor  # (R_train,)
    test_re: torch.Tensor  # (R_test,)
    meta: dict[str, Any] = field(default_factory=dict)

    def velocity_std(self) -> torch.Tensor:
        """``(2,)`` std of u and v over every training frame (the network's input/output scale)."""
        return self.train.transpose(0, 2).reshape(2, -1).std(dim=1)


def _paths(settings: DataSettings, cache_dir: Path) -> tuple[Path, Path]:
    stem = cache_dir / f"karman_{settings.key()}"
    return stem.with_suffix(".npz"), stem.with_suffix(".json")


def load(settings: DataSettings, cache_dir: Path) -> SolData:
    npz, meta_path = _paths(settings, cache_dir)
    if not npz.exists():
        raise ConfigError(f"no reference data for these settings in {cache_dir} (expected {npz.name}); "
                          "run `bbzo sol generate` with the same settings first.")
    try:
        with np.load(npz, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("train", "test", "train_re", "test_re")}
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    except Exception as e:  # zipfile/npz errors have many types
        raise ConfigError(f"{npz} is unreadable ({type(e).__name__}: {e}); delete it and generate again.") from e
    want = (2, settings.ny, settings.nx)
    for k in ("train", "test"):
        if arrays[k].ndim != 5 or arrays[k].shape[2:] != want or not np.isfinite(arrays[k]).all():
            raise ConfigError(f"{npz}: '{k}' has shape {arrays[k].shape} or non-finite values, expected "
                              f"(R, T, {', '.join(map(str, want))}); delete the file and generate again.")
    return SolData(settings, *(torch.from_numpy(arrays[k]) for k in ("train", "test", "train_re", "test_re")), meta=meta)


def generate(settings: DataSettings, cache_dir: Path, *, progress: bool = True, force: bool = False,
             device: Any = "cpu") -> SolData:
    """Load the cached reference data for ``settings`` or generate it (batched over every Re)."""
    npz, meta_path = _paths(settings, cache_dir)
    if npz.exists() and not force:
        return load(settings, cache_dir)
    from tqdm.auto import tqdm

    cache_dir.mkdir(parents=True, exist_ok=True)
    res = list(settings.train_re) + list(settings.test_re)
    re = torch.tensor(res, dtype=torch.float64)
    hi = KarmanSolver(settings.high, backend=settings.backend, jit=settings.backend == "torch", device=device)
    t0 = time.perf_counter()
    grid = hi.to_grid(hi.initial_state(res, poke=settings.poke))
    frames = np.empty((len(res), settings.frames, 2, settings.ny, settings.nx), np.float32)
    total = settings.warmup + settings.frames
    bar = tqdm(total=total, desc=f"reference {settings.high.nx}x{settings.high.ny} x {len(res)} Re",
               disable=not progress, unit="step", leave=False)
    for i in range(total):
        grid = hi.step_grid(grid, re)
        if i >= settings.warmup or i % 25 == 0:
            st = hi.from_grid(grid)
            if not bool(torch.isfinite(st).all()):
                raise ConfigError(f"the high-fidelity simulation diverged by step {i + 1}; use a smaller dt "
                                  "or a finer grid.")
            if i >= settings.warmup:
                frames[:, i - settings.warmup] = downsample_states(st.cpu(), settings.high, settings.factor).numpy()
        bar.update(1)
    bar.close()
    wall = time.perf_counter() - t0
    n_tr = len(settings.train_re)
    # shedding check: the cross-stream velocity behind the cylinder must oscillate over the recorded frames
    s = settings.low
    px, py = int(s.cylinder[0] / s.width * s.nx), int((s.cylinder[1] + 3 * s.radius) / s.height * s.ny)
    probe = frames[:, :, 0, py, px]
    amp = (probe.max(axis=1) - probe.min(axis=1)) / 2
    meta = {"format": FORMAT, "settings": {**asdict(settings), "train_re": list(settings.train_re),
                                          "test_re": list(settings.test_re)},
            "high": settings.high.to_dict(), "low": settings.low.to_dict(), "generate_seconds": round(wall, 1),
            "wake_probe_amplitude": {f"{r:g}": round(float(a), 4) for r, a in zip(res, amp)}}
    buf = io.BytesIO()
    np.savez(buf, train=frames[:n_tr], test=frames[n_tr:], train_re=np.array(settings.train_re, np.float32),
             test_re=np.array(settings.test_re, np.float32))
    atomic_write_bytes(npz, lambda f: f.write(buf.getvalue()))
    atomic_write_bytes(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return load(settings, cache_dir)


class RolloutBatches:
    """Training samples ``(Re, start frame t)`` -> inputs ``(state_t, Re)``, targets frames ``t+1 .. t+n``.

    An epoch visits every (simulation, start frame) pair once in a permutation drawn from
    ``(seed, epoch)``, so the batch of step ``s`` is a pure function of ``(seed, s)`` (exact resume).

    ``get_batch(step)`` -> ``((states (B, 2, ny, nx), re (B,)), targets (B, n, 2, ny, nx))``.
    """

    def __init__(self, frames: torch.Tensor, re: torch.Tensor, unroll: int, batch: int, seed: int = 0,
                 device: Any = None) -> None:
        r, t = frames.shape[:2]
        if not 1 <= unroll < t:
            raise ConfigError(f"unroll must be in [1, {t - 1}] for {t} recorded frames, got {unroll}.")
        self.frames, self.re, self.unroll, self.seed, self.device = frames, re, unroll, seed, device
        self.starts = t - unroll
        self.n = r * self.starts
        if not 1 <= batch <= self.n:
            raise ConfigError(f"batch must be in [1, {self.n}] ((sims x start frames)), got {batch}.")
        self.batch = batch
        self.steps_per_epoch = self.n // batch
        self._perm: Optional[tuple[int, torch.Tensor]] = None

    def get_batch(self, step: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        idx = self._perm[1][i * self.batch:(i + 1) * self.batch]
        sim, t0 = idx // self.starts, idx % self.starts
        steps = t0[:, None] + torch.arange(self.unroll + 1)
        win = self.frames[sim[:, None], steps]  # (B, n+1, 2, ny, nx)
        x, y, re = win[:, 0].contiguous(), win[:, 1:].contiguous(), self.re[sim].to(torch.float32)
        if self.device is not None:
            x, y, re = x.to(self.device), y.to(self.device), re.to(self.device)
        return (x, re), y
