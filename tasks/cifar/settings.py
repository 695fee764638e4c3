"""The settings of a CIFAR-10 run, declared once (flags, ``--config`` keys, presets, the run-folder policy).

The defaults are DeepZero's ResNet-20 recipe (§6.1 and its reference code): SGD lr 0.1,
momentum 0.9, weight decay 5e-4, 3-epoch linear warm-up then per-iteration cosine, mu 5e-3, 90%
sparsity with ZO-GraSP layer ratios, coordinates redrawn every 5 epochs, batch 256, 50 epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

from bbzo.config import setting
from bbzo.errors import ConfigError
from bbzo.task import RunSettings

__all__ = ["CifarSettings", "METHODS", "METHOD_NAMES", "PRESETS", "parse_lr"]

METHODS = ("fo", "rge", "cge", "deepzero")
METHOD_NAMES = {"fo": "FO (white-box)", "rge": "RGE (q = d)", "cge": "CGE", "deepzero": "DeepZero (Sparse-CGE)"}

PRESETS: dict[str, dict[str, Any]] = {
    # DeepZero Table / Fig. A5: ResNet-20 from scratch, every value the paper's (a GPU machine's job)
    "paper": {},
    # the CPU smoke run of the whole path (ZO-GraSP ratios -> dynamic Sparse-CGE -> accuracy rising), ~15 min on
    # 2 cores: 99.9% sparsity of the conv/linear weights (BN and biases dense, as the reference: 1,655 q/step), batch 16
    "smoke": dict(model="resnet20", method=("deepzero",), batch=16, sparsity=0.999, steps=60, epochs=1, lr=0.05,
                  warmup_epochs=0.0, resample_every=10, subset=10000, test_subset=500, eval_every=15,
                  checkpoint_every=10),
    # DeepZero Fig. 2 at CPU scale (benchmarks/cge_vs_rge.py): the 730-parameter CNN, no augmentation or weight
    # decay, cosine without warm-up; per-method rates of the benchmark's screen (1 epoch, held-out training images;
    # docs/results/fig2.md). The authors' rates (CGE 1e-3, RGE 1e-4) reach 15% after 5 epochs at this scale.
    "fig2": dict(model="simple_cnn_730", method=("fo", "cge", "rge"), batch=256, epochs=20, lr="fo=1,cge=1,rge=0.2",
                 weight_decay=0.0, warmup_epochs=0.0, augment=False, checkpoint_every=39),
}


@dataclass
class CifarSettings(RunSettings):
    """One CIFAR-10 experiment: the data, the model, and the training of each method."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = PRESETS

    preset: str = setting("paper", choices=tuple(PRESETS), compare=False, help=(
        "Base settings: paper (DeepZero's ResNet-20 recipe), smoke (a ~15 min CPU run of the DeepZero path), "
        "fig2 (Fig. 2 at CPU scale); flags and --config override its values."))
    data: Optional[Path] = setting(None, kind="path", runtime=True, help=(
        "CIFAR-10: a cifar-10-batches-py folder (or its parent) or an .npz with train_x/train_y/test_x/test_y."))
    method: tuple[str, ...] = setting(("deepzero",), runtime=True, help=(
        "Methods to train, comma-separated: fo (autograd, the white-box reference), rge (q directions), cge "
        "(every coordinate), deepzero (Sparse-CGE at ZO-GraSP ratios, redrawn every --resample-every steps)."))
    model: str = setting("resnet20", help="A model of `bbzo models` (resnet20, simple_cnn_730, simple_cnn_3700, ...).")
    subset: int = setting(0, help="Train on a class-balanced random subset of this many images (0: all).")
    test_subset: int = setting(0, help="Evaluate on a class-balanced subset of this many test images (0: all).")
    val_images: int = setting(0, help=(
        "Hold out this many class-balanced training images and evaluate on them instead of the test images "
        "(learning-rate screens never see the test set); 0: train on all, evaluate on the test set."))
    augment: bool = setting(True, help="Random crop (4 px padding) and horizontal flip.")
    epochs: int = setting(50, runtime=True, help="Training epochs (ignored when --steps is given).")
    steps: int = setting(0, runtime=True, help="Training steps (0: epochs x steps per epoch).")
    batch: int = setting(256, help="Images per step.")
    optimizer: str = setting("sgd", choices=("sgd", "adam"), help="Optimizer.")
    lr: str = setting("0.1", kind="str", metavar="LR|METHOD=LR,...", help=(
        "Learning rate: one number for every method, or one per method (fo=0.5,cge=0.5,rge=0.2; every trained "
        "method named). Paper ResNet-20: 0.1; fig2: the rates its screen chose per method."))
    momentum: float = setting(0.9, help="SGD momentum.")
    weight_decay: float = setting(5e-4, help="Weight decay.")
    warmup_epochs: float = setting(3.0, help="Linear warm-up epochs before the cosine decay.")
    schedule: str = setting("cosine", choices=("cosine", "constant"), help="Learning-rate schedule.")
    mu: float = setting(5e-3, help="Finite-difference step (forward differences) of CGE / RGE / DeepZero.")
    q: int = setting(0, help="RGE directions per step (0: d, the number of parameters: CGE's query count).")
    sparsity: float = setting(0.9, help="DeepZero: fraction of the conv/linear weights left out of each step.")
    score: str = setting("zo_grasp", help="DeepZero: the pruning-at-init score that sets the layer ratios.")
    score_q: int = setting(192, help="DeepZero: ZO-GraSP's RGE directions.")
    resample_every: int = setting(0, help="DeepZero: redraw the coordinate set every N steps (0: every 5 epochs).")
    eval_every: int = setting(0, runtime=True, help="Test accuracy every N steps (0: every epoch).")
    seed: int = setting(0, help="Seed of the init, the batch order, the augmentation, RGE and the sparse draws.")
    device: str = setting("cpu", runtime=True, help="cpu, cuda, cuda:1, ...")
    checkpoint_every: int = setting(50, runtime=True, help="Checkpoint every N steps.")
    max_queries: Optional[int] = setting(None, runtime=True, help="Stop a training when it has used this many queries.")
    out: Path = setting(Path("runs/cifar"), kind="path", runtime=True, help="Run folder; each method trains into OUT/METHOD.")

    def __post_init__(self) -> None:
        bad = [m for m in self.method if m not in METHODS]
        if bad or not self.method:
            raise ConfigError(f"unknown method {bad[0] if bad else ''!r}; choose from {', '.join(METHODS)} "
                              "(comma-separated, e.g. --method fo,cge).")
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}.")
        from bbzo.sparsity import list_scores  # here: the settings module stays light (the command line imports it)

        if self.score not in list_scores():
            raise ConfigError(f"unknown score {self.score!r}; choose from {', '.join(list_scores())}.")
        if self.batch < 1 or self.epochs < 0 or self.steps < 0 or self.q < 0 or self.resample_every < 0:
            raise ConfigError("batch must be >= 1 and epochs, steps, q, resample_every >= 0.")
        if self.mu <= 0:
            raise ConfigError(f"mu must be > 0, got {self.mu}.")
        if self.val_images < 0:
            raise ConfigError(f"val_images must be >= 0, got {self.val_images}.")
        rates = parse_lr(self.lr)
        if isinstance(rates, dict):
            missing = [m for m in self.method if m not in rates]
            if missing:
                raise ConfigError(f"--lr {self.lr} names no rate for {', '.join(missing)}; add {missing[0]}=RATE or give "
                                  "one number for every method.")

    def lr_of(self, method: str) -> float:
        """The learning rate of ``method`` (``--lr`` is one number or one per method)."""
        rates = parse_lr(self.lr)
        return rates[method] if isinstance(rates, dict) else rates


def parse_lr(text: Any) -> Any:
    """``"0.1"`` -> 0.1; ``"fo=0.5,cge=0.5,rge=0.2"`` -> ``{"fo": 0.5, ...}``; a clear error for anything else."""
    text = str(text).strip()
    how = "give one number (--lr 0.1) or one per method (--lr fo=0.5,cge=0.5,rge=0.2)"

    def number(v: str) -> float:
        try:
            return float(v)
        except ValueError:
            raise ConfigError(f"--lr {text!r} is not a learning rate: {how}.") from None

    if "=" not in text:
        rate: Any = number(text)
        values = [rate]
    else:
        rate = {}
        for part in text.split(","):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in METHODS:
                raise ConfigError(f"--lr {text}: unknown method {name!r}; methods: {', '.join(METHODS)}.")
            if name in rate:
                raise ConfigError(f"--lr {text}: {name} is given twice.")
            rate[name] = number(value)
        values = list(rate.values())
    if not all(v > 0 for v in values):
        raise ConfigError(f"--lr {text}: learning rates must be > 0.")
    return rate
