"""The settings of the defense commands, declared once: ``pretrain``, ``finetune``, ``certify``.

Defaults follow DeepZero App. G and ../shared/research/defense.md: sigma 0.25 in [0, 1] pixel units, DnCNN
depth 17 / width 64, MSE pretraining with Adam; fine-tuning minimises CE(f(D(x + delta)), argmax f(x)) with
Adam at lr 1e-5 divided by 10 every 4 epochs, mu 5e-3, a budget of 1,152 coordinates per ZO gradient (of
the last layer's 1,728, redrawn every 5 epochs; the paper's ZO-GraSP at 95% sparsity keeps almost only the
first and last layers, and it ends with the last one). CERTIFY: n0 100, n 10,000, alpha 0.001.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

from bbzo.config import setting
from bbzo.errors import ConfigError
from bbzo.oracles.classifier import IMAGENET_MEAN, IMAGENET_STD
from bbzo.task import RunSettings

__all__ = ["DefenseBase", "PretrainSettings", "FinetuneSettings", "CertifySettings", "METHODS", "METHOD_NAMES"]

METHODS = ("zo", "fo", "zo-ds")
METHOD_NAMES = {"none": "no denoiser", "mse": "MSE-pretrained denoiser", "zo": "DeepZero (ZO, Sparse-CGE)",
                "fo": "FO-DS (white-box gradients, upper reference)", "zo-ds": "ZO-DS (chain-rule RGE, q = 192)"}


@dataclass
class DefenseBase(RunSettings):
    """What every defense command needs: the images, the noise, the denoiser's shape, and the black box."""

    data: Optional[Path] = setting(None, kind="path", runtime=True, help=(
        "Images: an .npz with x_train/y_train/x_val/y_val (e.g. ../shared/data/imagenette_32px.npz) or "
        "train_x/train_y/test_x/test_y, or a cifar-10-batches-py folder."))
    classifier: str = setting("resnet50", help=(
        "The black box: a torchvision model name (resnet50), timm:NAME, a TorchScript file, or module:attr."))
    weights: Optional[Path] = setting(None, kind="path", help="The classifier's state dict (.pt / .safetensors).")
    num_classes: int = setting(10, help="Classifier outputs (for architectures built by name).")
    mean: tuple[float, ...] = setting(IMAGENET_MEAN, help="The classifier's input normalization mean (per channel).")
    std: tuple[float, ...] = setting(IMAGENET_STD, help="The classifier's input normalization std (per channel).")
    output: str = setting("logits", choices=("logits", "probs"), help="What the black box answers.")
    max_batch: int = setting(512, runtime=True, help="Images per classifier call (memory bound).")
    sigma: float = setting(0.25, help="Gaussian noise level in [0, 1] pixel units (train and certify).")
    depth: int = setting(17, help="DnCNN depth (Salman et al.: 17).")
    width: int = setting(64, help="DnCNN width (Salman et al.: 64).")
    subset: int = setting(0, help="Train on a class-balanced random subset of this many images (0: all).")
    test_subset: int = setting(0, help="Evaluate / certify a class-balanced subset of this many test images (0: all).")
    seed: int = setting(0, help="Seed of the batch order, the noise, the sparse draws and the init.")
    device: str = setting("cpu", runtime=True, help="cpu, cuda, cuda:1, ...")

    def __post_init__(self) -> None:
        if self.sigma <= 0:
            raise ConfigError(f"sigma must be > 0, got {self.sigma}.")
        if self.depth < 2 or self.width < 1 or self.num_classes < 2 or self.max_batch < 1:
            raise ConfigError("need depth >= 2, width >= 1, num_classes >= 2, max_batch >= 1.")


@dataclass
class PretrainSettings(DefenseBase):
    """``bbzo defense pretrain``: MSE(D(x + delta), x) with Adam; the classifier is not used."""

    epochs: int = setting(90, runtime=True, help="Epochs (Salman et al.: 90).")
    steps: int = setting(0, runtime=True, help="Steps (0: epochs x steps per epoch).")
    batch: int = setting(256, help="Images per step.")
    lr: float = setting(1e-3, help="Adam learning rate (Salman et al.: 1e-3, divided by 10 every 30 epochs).")
    lr_step_epochs: float = setting(30.0, help="Divide the learning rate by 10 every this many epochs (0: never).")
    weight_decay: float = setting(1e-4, help="Adam weight decay.")
    eval_every: int = setting(0, runtime=True, help="Test PSNR every N steps (0: every epoch).")
    checkpoint_every: int = setting(50, runtime=True, help="Checkpoint every N steps.")
    out: Path = setting(Path("runs/defense/pretrain"), kind="path", runtime=True, help="Run folder (model.pt).")


@dataclass
class FinetuneSettings(DefenseBase):
    """``bbzo defense finetune``: CE(f(D(x + delta)), argmax f(x)) with f only queried (FO-DS: white-box)."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"paper": {}}

    preset: str = setting("paper", choices=("paper",), compare=False, help="Base settings (paper: DeepZero App. G).")
    denoiser: Optional[Path] = setting(None, kind="path", help=(
        "The MSE-pretrained denoiser (model.pt of `bbzo defense pretrain`, or Salman et al.'s state dict)."))
    method: tuple[str, ...] = setting(("zo",), runtime=True, help=(
        "Methods, comma-separated: zo (DeepZero: Sparse-CGE on the fine-tuned layers, queries only), fo (FO-DS: "
        "white-box gradients through the classifier, the upper reference), zo-ds (RGE on the denoised image, "
        "q = --q, then autograd through the denoiser)."))
    layers: str = setting("last", choices=("last", "grasp"), help=(
        "zo: fine-tune the last conv (the paper's outcome of ZO-GraSP), or every layer at the ZO-GraSP ratios."))
    budget: int = setting(1152, help="zo: coordinates per ZO gradient (1,152 = ZO-AE-DS's query budget; capped at the layers' size).")
    grasp_sparsity: float = setting(0.95, help="zo: ZO-GraSP's global sparsity on the pretrained denoiser.")
    score_q: int = setting(192, help="zo: ZO-GraSP's RGE directions.")
    resample_every: int = setting(0, help="zo: redraw the coordinate set every N steps (0: every 5 epochs).")
    q: int = setting(192, help="zo-ds: RGE directions in the denoised image's space.")
    mu: float = setting(5e-3, help="Finite-difference step (forward differences).")
    epochs: int = setting(20, runtime=True, help="Epochs (paper: 20).")
    steps: int = setting(0, runtime=True, help="Steps (0: epochs x steps per epoch).")
    batch: int = setting(256, help="Images per step.")
    lr: float = setting(1e-5, help="Adam learning rate (paper: 1e-5).")
    method_lr: dict = setting(kind="mapping", default_factory=dict, help=(
        "Per-method learning rates overriding --lr, e.g. '{fo: 1e-4, zo-ds: 1e-4}' (fo and zo-ds move every "
        "denoiser weight, zo only the fine-tuned layers)."))
    lr_step_epochs: float = setting(4.0, help="Divide the learning rate by 10 every this many epochs (0: never).")
    eval_every: int = setting(0, runtime=True, help="Noisy test accuracy every N steps (0: every epoch).")
    checkpoint_every: int = setting(20, runtime=True, help="Checkpoint every N steps.")
    max_queries: Optional[int] = setting(None, runtime=True, help="Stop a training when it has used this many queries.")
    out: Path = setting(Path("runs/defense/finetune"), kind="path", runtime=True, help="Run folder; OUT/METHOD per method.")

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [m for m in self.method if m not in METHODS]
        if bad or not self.method:
            raise ConfigError(f"unknown method {bad[0] if bad else ''!r}; choose from {', '.join(METHODS)}.")
        if self.budget < 1 or self.q < 1 or self.mu <= 0 or self.lr <= 0:
            raise ConfigError("need budget >= 1, q >= 1, mu > 0, lr > 0.")
        bad_lr = [k for k, v in self.method_lr.items() if k not in METHODS or float(v) <= 0]
        if bad_lr:
            raise ConfigError(f"method_lr: {bad_lr[0]!r} is not a method of {METHODS} with a rate > 0.")
        if not 0 <= self.grasp_sparsity < 1:
            raise ConfigError(f"grasp_sparsity must be in [0, 1), got {self.grasp_sparsity}.")


@dataclass
class CertifySettings(DefenseBase):
    """``bbzo defense certify``: Cohen et al.'s CERTIFY of f(D(x + delta)) for each named denoiser."""

    denoisers: dict = setting(kind="mapping", default_factory=dict, help=(
        "Denoisers to certify, NAME: model.pt, e.g. '{mse: runs/p/model.pt, zo: runs/f/zo/model.pt}'; "
        "`none` (no denoiser) is always certified."))
    n0: int = setting(100, help="Samples that pick the top class.")
    n: int = setting(10000, help="Samples that bound its probability (the largest certifiable radius grows with n).")
    alpha: float = setting(0.001, help="Failure probability of each certificate.")
    batch: int = setting(500, runtime=True, help="Noise samples per pipeline call.")
    skip: int = setting(1, help="Certify every SKIP-th test image (Cohen: every 100th ImageNet image).")
    radii: tuple[float, ...] = setting((0.0, 0.25, 0.5, 0.75), help="Radii of the certified-accuracy table.")
    out: Path = setting(Path("runs/defense/certify"), kind="path", runtime=True, help="Run folder; OUT/NAME/certify.tsv.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n0 < 1 or self.n < 1 or not 0 < self.alpha < 1 or self.skip < 1 or self.batch < 1:
            raise ConfigError("need n0, n, skip, batch >= 1 and 0 < alpha < 1.")
        for name, path in self.denoisers.items():
            if name == "none":
                raise ConfigError("`none` is always certified; do not name a denoiser `none`.")
            if not Path(str(path)).is_file():
                raise ConfigError(f"denoiser {name}: {path} does not exist (train it with `bbzo defense pretrain` "
                                  "or `bbzo defense finetune`).")
