"""The settings of a ZO-SOL run, declared once (flags, ``--config`` keys, presets, the run-folder policy)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

from bbzo.config import setting
from bbzo.errors import ConfigError
from bbzo.models.sol_corrector import CORRECTOR_CHANNELS
from bbzo.task import RunSettings

from .data import TEST_RE, TRAIN_RE, DataSettings

__all__ = ["SolSettings", "METHODS", "METHOD_NAMES", "METHOD_SETTINGS", "PRESETS"]

#: In training order: nog, zo, hybrid and fo fine-tune NON's corrector when init="non".
METHODS = ("src", "non", "nog", "zo", "hybrid", "fo")
METHOD_NAMES = {"src": "SRC", "non": "NON", "nog": "NOG (no solver gradient)", "zo": "ZO-SOL",
                "hybrid": "ZO-SOL + NOG (hybrid_cge)", "fo": "FO-SOL (white-box)"}
#: The settings only one method reads (a result of another method cannot depend on them: benchmarks that cache
#: one result per method leave them out of that method's key). ``lr`` is shared: NOG and FO-SOL default to it.
METHOD_SETTINGS: dict[str, tuple[str, ...]] = {
    "non": ("non_steps", "non_batch", "non_lr", "non_schedule"),
    "nog": ("nog_lr",),
    "zo": ("sparsity", "score", "score_q", "resample_every", "mu", "sets_per_call"),
    "hybrid": ("hybrid_lr", "sparsity", "score", "score_q", "resample_every", "mu", "sets_per_call"),
    "fo": ("fo_lr",),
}

PRESETS: dict[str, dict] = {
    # `make demo` (~6-7 min on 2 CPU cores, data generated on the spot, 2 held-out Re): the small preset's
    # protocol at demo scale -- NON (unchanged: 400 steps, constant 1e-3) is trained first, then NOG, ZO-SOL and
    # FO-SOL fine-tune it on the 4-step unrolled loss for 100 steps with a cosine decay. Their learning rates are
    # the best validation MAE (training Re, seed 0) of the same screen, 3e-4 / 1e-3 / 3e-3, for each method
    # (docs/results/sol.md)
    # The demo trains the completed estimator (hybrid: ZO-SOL's queries + NOG's free gradient) and leaves plain ZO-SOL
    # to the benchmark (both would take ~10 min): `--methods src,non,nog,zo,hybrid,fo` adds it.
    "demo": dict(train_re=(195.3, 781.3, 3125.0), test_re=(390.6, 1562.5), warmup=300, frames=60,
                 methods=("src", "non", "nog", "hybrid", "fo"),
                 corrector="tiny", unroll=4, batch=1, steps=100, lr=1e-3, nog_lr=1e-3, fo_lr=3e-3, schedule="cosine",
                 init="non", sets_per_call=32, score_q=24, non_steps=400, non_lr=1e-3, checkpoint_every=10),
    # benchmarks/sol_small.json: all of the paper's Re, 100-frame rollouts, the tiny corrector. NON is trained
    # to convergence (cosine, 2400 steps); ZO-SOL, NOG and FO-SOL fine-tune it on the unrolled loss
    # (docs/results/sol.md: every value here was chosen by the validation MAE on the training Re, never the test Re)
    "small": dict(warmup=400, frames=100, corrector="tiny", unroll=4, batch=1, steps=300, lr=3e-4, fo_lr=1e-3,
                  nog_lr=1e-3, schedule="cosine", init="non", sets_per_call=32, score_q=48, non_steps=2400, non_lr=3e-3,
                  non_schedule="cosine", validate=True, checkpoint_every=20),
    # Appendix H for a GPU machine: 64x128 reference, 1000 warm-up + 500 frames, the paper's corrector, n=16,
    # Adam 1e-4 (steps = 10 epochs of 6 sims x 484 start frames / batch 3)
    "paper": dict(warmup=1000, frames=500, corrector="paper", unroll=16, batch=3, steps=9680, lr=1e-4,
                  sets_per_call=64, score_q=192, non_steps=9680, non_lr=1e-4, checkpoint_every=50),
}


@dataclass
class SolSettings(RunSettings):
    """One ZO-SOL experiment: the reference data, the corrector, and the four methods' training."""

    PRESETS: ClassVar[dict[str, dict]] = PRESETS

    preset: str = setting("demo", choices=tuple(PRESETS), compare=False, help=(
        "Base settings: demo (~6 min CPU), small (CPU benchmark), paper (Appendix H, GPU); flags and --config "
        "override its values."))
    methods: tuple[str, ...] = setting(METHODS, runtime=True, help="Methods to train and compare: src (solver alone), "
                                       "non (supervised one-step), nog (unrolled, no solver gradient), zo (ZO-SOL), "
                                       "fo (FO-SOL, white-box).")
    # ---- the reference data
    train_re: tuple[float, ...] = setting(TRAIN_RE, help="Training Reynolds numbers, comma-separated (paper: 97.7,...,3125); a list in --config.")
    test_re: tuple[float, ...] = setting(TEST_RE, help="Held-out test Reynolds numbers, comma-separated.")
    nx: int = setting(32, help="Solver grid cells along x (paper 32).")
    ny: Optional[int] = setting(None, help="Solver grid cells along y (paper 64; default 2 nx).")
    factor: int = setting(2, help="High-fidelity grid = factor x solver grid (power of 2; paper 2).")
    warmup: int = setting(1000, help="Reference steps discarded before recording (the wake must shed).")
    frames: int = setting(500, help="Reference frames recorded per Re.")
    poke: float = setting(1.0, help="Sideways velocity kick that starts the shedding.")
    data_dir: Path = setting(Path("runs/sol-data"), kind="path", runtime=True, help=(
        "Cache of reference data (keyed by the settings that decide it; shared between runs)."))
    # ---- the corrector and the rollouts
    corrector: str = setting("paper", help="tiny 2,618 / small 8,434 / paper 56,898 parameters (the paper's network).")
    unroll: int = setting(16, help="Solver steps per training rollout (paper 16).")
    batch: int = setting(3, help="Rollouts per training step.")
    steps: int = setting(1000, runtime=True, help="Training steps of the unrolled methods (ZO-SOL, NOG, FO-SOL).")
    lr: float = setting(1e-4, help="Adam learning rate of ZO-SOL (and of NOG / FO-SOL unless --nog-lr / --fo-lr).")
    fo_lr: Optional[float] = setting(None, help="Adam learning rate of FO-SOL (default: --lr).")
    nog_lr: Optional[float] = setting(None, help="Adam learning rate of NOG (default: --lr).")
    hybrid_lr: Optional[float] = setting(None, help="Adam learning rate of hybrid (ZO-SOL + NOG; default: --lr).")
    schedule: str = setting("constant", choices=("constant", "cosine"), help=(
        "Learning-rate schedule of ZO-SOL, NOG and FO-SOL: constant, or cosine decay to 0 after a 5% linear "
        "warm-up."))
    init: str = setting("scratch", choices=("scratch", "non"), help=(
        "ZO-SOL / NOG / FO-SOL start: scratch (paper) or the trained NON corrector (train non first)."))
    # ---- ZO-SOL
    sparsity: float = setting(0.95, help="ZO-SOL gradient sparsity (paper 0.95).")
    score: str = setting("zo_grasp", help="Pruning score for the layer-wise ratios (bbzo prune --list).")
    score_q: int = setting(192, help="Directions per RGE estimate of the score (zo_grasp: 192).")
    resample_every: int = setting(1, help="Redraw the sparse coordinate set every N steps.")
    mu: float = setting(1e-4, help="Finite-difference step of CGE (forward differences; DeepZero's 5e-3 is "
                        "curvature-biased here, see the README).")
    sets_per_call: int = setting(32, help="Perturbed correctors per PhiFlow batch (batch = this x --batch).")
    # ---- NON
    non_steps: int = setting(1000, runtime=True, help="Training steps of NON.")
    non_batch: int = setting(32, help="Pairs per NON step.")
    non_lr: float = setting(1e-3, help="Adam learning rate of NON.")
    non_schedule: str = setting("constant", choices=("constant", "cosine"), help=(
        "Learning-rate schedule of NON: constant, or cosine decay to 0 after a 5% linear warm-up."))
    # ---- all
    eval_steps: int = setting(0, runtime=True, help="Evaluation rollout length (0: every recorded frame).")
    validate: bool = setting(False, runtime=True, help=(
        "Also report val_mae: full rollouts on the training Re, the validation to choose settings by (never the "
        "test Re)."))
    init_jitter: float = setting(0.0, help=(
        "Relative noise added to the initial corrector's weights (a numerics-sensitivity probe; 0: none)."))
    backend: str = setting("torch", choices=("torch", "numpy"), runtime=True, help=(
        "PhiFlow backend of the black-box solver (numpy: no graph can exist)."))
    seed: int = setting(0, help="Seed of the corrector init, the batches, the score and the sparse draws.")
    device: str = setting("cpu", runtime=True, help="cpu, cuda, cuda:1, ...")
    checkpoint_every: int = setting(10, runtime=True, help="Checkpoint every N training steps.")
    out: Path = setting(Path("runs/sol-demo"), kind="path", runtime=True, help="Run folder; each method trains into OUT/METHOD.")

    def __post_init__(self) -> None:
        if self.corrector == "mercury":  # the name it had before
            warnings.warn("corrector 'mercury' is now called 'paper'.", DeprecationWarning, stacklevel=2)
            self.corrector = "paper"
        if self.corrector not in CORRECTOR_CHANNELS:
            raise ConfigError(f"corrector must be one of {', '.join(CORRECTOR_CHANNELS)}, got {self.corrector!r}.")
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}.")
        if self.unroll < 1 or self.batch < 1 or self.steps < 0:
            raise ConfigError("unroll and batch must be >= 1 and steps >= 0.")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ConfigError(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}.")
        if not self.methods:
            raise ConfigError(f"no methods given; choose from {', '.join(METHODS)} (e.g. --methods src,zo).")
        self.data  # validates the data settings now, not at generation time

    @property
    def data(self) -> DataSettings:
        """The settings that decide the reference data (and its cache key)."""
        return DataSettings(nx=self.nx, ny=self.ny if self.ny is not None else 2 * self.nx, factor=self.factor,
                            train_re=tuple(self.train_re), test_re=tuple(self.test_re), warmup=self.warmup,
                            frames=self.frames, poke=self.poke, backend=self.backend)
