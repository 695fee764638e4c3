"""The settings of the defense commands, declared once: ``classifier``, ``pretrain``, ``finetune``, ``certify``.

Defaults follow DeepZero App. G (and docs/results/defense.md): sigma 0.25 in [0, 1] pixel units, DnCNN
depth 17 / width 64, MSE pretraining with Adam; fine-tuning minimises CE(f(D(x + delta)), argmax f(x)) with
Adam at lr 1e-5 divided by 10 every 4 epochs, mu 5e-3, a budget of 1,152 coordinates per ZO gradient (of
the last layer's 1,728, redrawn every 5 epochs; the paper's ZO-GraSP at 95% sparsity keeps almost only the
first and last layers, and it ends with the last one). CERTIFY: n0 100, n 10,000, alpha 0.001.

Each command has ``--preset paper`` (these defaults: a GPU's job) and ``--preset small`` (:data:`SMALL`: the
walk-through of docs/results/defense.md, minutes per stage on 2 CPU cores with ../shared/data/imagenette_32px.npz).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

from bbzo.config import setting
from bbzo.errors import ConfigError
from bbzo.oracles.classifier import IMAGENET_MEAN, IMAGENET_STD, is_reference
from bbzo.task import RunSettings

__all__ = ["ImageSettings", "DefenseBase", "ClassifierSettings", "PretrainSettings", "FinetuneSettings",
           "CertifySettings", "METHODS", "METHOD_NAMES", "SMALL", "SMALL_CLASSIFIER"]

METHODS = ("zo", "fo", "zo-ds")
METHOD_NAMES = {"none": "no denoiser", "mse": "MSE-pretrained denoiser", "zo": "DeepZero (ZO, Sparse-CGE)",
                "fo": "FO-DS (white-box gradients, upper reference)", "zo-ds": "ZO-DS (chain-rule RGE)"}

# --preset small: the laptop walk-through (docs/results/defense.md, "Quick start"). The classifier that
# `bbzo defense classifier --preset small` trains is the black box the other small presets name.
SMALL_CLASSIFIER = "timm:resnet10t"
SMALL: dict[str, dict[str, Any]] = {
    "classifier": dict(classifier=SMALL_CLASSIFIER, epochs=6, batch=128, lr=0.1, test_subset=1000),
    "pretrain": dict(depth=5, width=32, epochs=3, batch=64, lr=1e-3, lr_step_epochs=0.0, test_subset=500,
                     eval_every=0, checkpoint_every=50),
    "finetune": dict(classifier=SMALL_CLASSIFIER, method=("zo",), steps=40, batch=16, lr=1e-3, lr_step_epochs=0.0,
                     budget=288, score_q=16, test_subset=500, eval_every=10, checkpoint_every=10),
    "certify": dict(classifier=SMALL_CLASSIFIER, n0=50, n=500, test_subset=100, batch=550),
}


@dataclass
class ImageSettings(RunSettings):
    """The images a defense command reads, and where it runs."""

    data: Optional[Path] = setting(None, kind="path", runtime=True, help=(
        "Images: an ImageFolder root (DATA/train/<class>/*.jpg and DATA/val/<class>/*.jpg, as ImageNet ships), an "
        ".npz with x_train/y_train/x_val/y_val (e.g. ../shared/data/imagenette_32px.npz) or train_x/train_y/"
        "test_x/test_y, or a cifar-10-batches-py folder."))
    image_size: int = setting(0, help=(
        "Image folders: resize the shorter side to image_size / crop_pct and centre-crop image_size (0: 224, the "
        "standard Resize(256) + CenterCrop(224)). Array files are used at their stored size."))
    crop_pct: float = setting(0.875, help="Image folders: the centre crop's share of the resized image (timm's crop_pct).")
    loader_workers: int = setting(2, runtime=True, help=(
        "DataLoader processes that decode image-folder images while the device works (0: in this process)."))
    subset: int = setting(0, help="Train on a class-balanced random subset of this many images (0: all).")
    test_subset: int = setting(0, help="Evaluate / certify a class-balanced subset of this many test images (0: all).")
    seed: int = setting(0, help="Seed of the batch order, the noise, the sparse draws and the init.")
    device: str = setting("cpu", runtime=True, help="cpu, cuda, cuda:1, ...")

    def _check_images(self) -> None:
        if self.image_size < 0 or self.loader_workers < 0 or not 0 < self.crop_pct <= 1:
            raise ConfigError("need image_size >= 0, loader_workers >= 0 and 0 < crop_pct <= 1.")


@dataclass
class DefenseBase(ImageSettings):
    """What the denoiser commands need besides the images: the black box, the noise and the denoiser's shape."""

    classifier: str = setting("resnet50", help=(
        "The black box: a torchvision model name (resnet50), timm:NAME, a TorchScript / torch.export file, or "
        "module:attr / file.py:attr (an nn.Module, its class, or a batched function)."))
    weights: Optional[Path] = setting(None, kind="path", help=(
        "The classifier's state dict (.pt / .safetensors) for an architecture or module; not for TorchScript files."))
    num_classes: int = setting(10, help="Classifier outputs (for architectures built by name).")
    class_map: Optional[str] = setting(None, help=(
        "Which classifier outputs answer which data class: imagenette (the built-in Imagenette -> ImageNet-1k "
        "map), or a YAML/JSON file {data class: index or [indices]}. Needed when the classifier's class count "
        "differs from the data's (a 1000-class model on a 10-class set)."))
    mean: tuple[float, ...] = setting(IMAGENET_MEAN, help="The classifier's input normalization mean (per channel).")
    std: tuple[float, ...] = setting(IMAGENET_STD, help="The classifier's input normalization std (per channel).")
    output: str = setting("logits", choices=("logits", "probs"), help="What the black box answers.")
    max_batch: int = setting(512, runtime=True, help="Images per classifier call (memory bound).")
    sigma: float = setting(0.25, help="Gaussian noise level in [0, 1] pixel units (train and certify).")
    denoiser_arch: str = setting("dncnn", help=(
        "The denoiser's architecture, for files that do not record one (bbzo's model.pt files record theirs): "
        "dncnn (--depth, --width), or module:attr / file.py:attr (an nn.Module, its class, or a builder taking "
        "--denoiser-kwargs)."))
    denoiser_kwargs: dict = setting(kind="mapping", default_factory=dict, help=(
        "Keyword arguments of a module:attr denoiser's class or builder, e.g. '{channels: 3, width: 32}'."))
    depth: int = setting(17, help="DnCNN depth (Salman et al.: 17).")
    width: int = setting(64, help="DnCNN width (Salman et al.: 64).")

    def denoiser_spec(self) -> dict[str, Any]:
        """The architecture the flags name (used for weights files that record none)."""
        from .denoisers import dncnn_spec, reference_spec
        if self.denoiser_arch == "dncnn":
            if self.denoiser_kwargs:
                raise ConfigError("--denoiser-kwargs apply to a module:attr denoiser; a DnCNN takes --depth and --width.")
            return dncnn_spec(self.depth, self.width)
        return reference_spec(self.denoiser_arch, self.denoiser_kwargs)

    def __post_init__(self) -> None:
        if self.sigma <= 0:
            raise ConfigError(f"sigma must be > 0, got {self.sigma}.")
        if self.depth < 2 or self.width < 1 or self.num_classes < 2 or self.max_batch < 1:
            raise ConfigError("need depth >= 2, width >= 1, num_classes >= 2, max_batch >= 1.")
        self._check_images()
        if self.denoiser_arch != "dncnn" and not is_reference(self.denoiser_arch):
            raise ConfigError(f"--denoiser-arch {self.denoiser_arch!r}: use dncnn, module:attr or file.py:attr (a "
                              "TorchScript / torch.export file is itself a denoiser: pass it as --denoiser).")


@dataclass
class ClassifierSettings(ImageSettings):
    """``bbzo defense classifier``: train the black box on the clean images (its owner's training, first-order).

    SGD with Nesterov momentum, cosine decay per step, random crops (``pad`` pixels) and horizontal flips; the
    inputs are normalized with ``mean`` / ``std`` as the query-only classifier of the other commands will.
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"paper": {}, "small": SMALL["classifier"]}

    preset: str = setting("paper", choices=("paper", "small"), compare=False, help=(
        "Base settings: paper (a ResNet-50, 30 epochs: a GPU's job) or small (timm:resnet10t, 6 epochs: minutes on "
        "2 CPU cores at 32 px)."))
    classifier: str = setting("resnet50", help=(
        "The architecture: a torchvision model name (resnet50) or timm:NAME (timm:resnet10t). Pass the same name "
        "as --classifier, and OUT/model.pt as --weights, to the other defense commands."))
    num_classes: int = setting(0, help="Classifier outputs (0: the data's class count).")
    mean: tuple[float, ...] = setting(IMAGENET_MEAN, help="Input normalization mean (per channel).")
    std: tuple[float, ...] = setting(IMAGENET_STD, help="Input normalization std (per channel).")
    epochs: int = setting(30, runtime=True, help="Epochs.")
    steps: int = setting(0, runtime=True, help="Steps (0: epochs x steps per epoch).")
    batch: int = setting(128, help="Images per step.")
    lr: float = setting(0.1, help="SGD learning rate (cosine decay to 0 over the run).")
    momentum: float = setting(0.9, help="SGD (Nesterov) momentum.")
    weight_decay: float = setting(5e-4, help="SGD weight decay.")
    pad: int = setting(4, help="Random-crop padding in pixels (0: no crops; flips always).")
    eval_every: int = setting(0, runtime=True, help="Clean test accuracy every N steps (0: every epoch).")
    checkpoint_every: int = setting(50, runtime=True, help="Checkpoint every N steps.")
    out: Path = setting(Path("runs/defense/classifier"), kind="path", runtime=True, help=(
        "Run folder: model.pt (the classifier's state dict, for --weights)."))

    def __post_init__(self) -> None:
        self._check_images()
        if self.num_classes == 1 or self.num_classes < 0 or self.batch < 1 or self.lr <= 0 or self.pad < 0:
            raise ConfigError("need num_classes 0 (the data's) or >= 2, batch >= 1, lr > 0 and pad >= 0.")
        if is_reference(self.classifier) or Path(self.classifier).suffix:
            raise ConfigError(f"--classifier {self.classifier}: `bbzo defense classifier` trains an architecture by "
                              "name (resnet50, timm:resnet10t); a module or file you bring is already a classifier.")


@dataclass
class PretrainSettings(DefenseBase):
    """``bbzo defense pretrain``: MSE(D(x + delta), x) with Adam; the classifier is not used."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"paper": {}, "small": SMALL["pretrain"]}

    preset: str = setting("paper", choices=("paper", "small"), compare=False, help=(
        "Base settings: paper (Salman et al.'s DnCNN 17 x 64, 90 epochs) or small (DnCNN 5 x 32, 3 epochs: minutes "
        "on 2 CPU cores at 32 px)."))

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

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"paper": {}, "small": SMALL["finetune"]}

    preset: str = setting("paper", choices=("paper", "small"), compare=False, help=(
        "Base settings: paper (DeepZero App. G) or small (zo only, 40 steps of 16 images, 288 coordinates per step, "
        f"the {SMALL_CLASSIFIER} of `bbzo defense classifier --preset small`: minutes on 2 CPU cores at 32 px)."))
    denoiser: Optional[Path] = setting(None, kind="path", help=(
        "The MSE-pretrained denoiser: model.pt of `bbzo defense pretrain` (it records its architecture), Salman et "
        "al.'s state dict (--depth/--width), a module:attr, or a TorchScript / torch.export file (with --adapter-width)."))
    adapter_width: int = setting(0, help=(
        "Fine-tune a small DnCNN adapter after the frozen denoiser instead of the denoiser itself (0: no adapter): "
        "the mode for compiled files and large pretrained denoisers. Its last conv starts at zero (identity)."))
    adapter_depth: int = setting(2, help="The adapter's depth (2: conv 3->W, ReLU, conv W->3).")
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
        if self.adapter_width < 0 or self.adapter_depth < 2:
            raise ConfigError("need adapter_width >= 0 (0: no adapter) and adapter_depth >= 2.")
        if self.denoiser is not None:
            _check_source("--denoiser", self.denoiser)


@dataclass
class CertifySettings(DefenseBase):
    """``bbzo defense certify``: Cohen et al.'s CERTIFY of f(D(x + delta)) for each named denoiser."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"paper": {}, "small": SMALL["certify"]}

    preset: str = setting("paper", choices=("paper", "small"), compare=False, help=(
        "Base settings: paper (n = 10,000 on every test image) or small (n0 = 50, n = 500 on 100 test images, the "
        f"{SMALL_CLASSIFIER} of `bbzo defense classifier --preset small`: minutes on 2 CPU cores at 32 px)."))

    denoisers: dict = setting(kind="mapping", default_factory=dict, help=(
        "Denoisers to certify, NAME: SOURCE, e.g. '{mse: runs/p/model.pt, zo: runs/f/zo/model.pt}'; a SOURCE is a "
        "model.pt (its architecture is recorded; older files use --depth/--width), a TorchScript / torch.export "
        "file, or module:attr. `none` (the classifier alone) is certified too unless --pipelines leaves it out."))
    pipelines: tuple[str, ...] = setting((), runtime=True, help=(
        "Which pipelines to certify, comma-separated, of none and the --denoisers names (default: all); "
        "--resume may add one."))
    predict: bool = setting(False, help=(
        "Run Cohen et al.'s PREDICT (n samples; abstain unless the top-two binomial test has p <= alpha) instead of "
        "CERTIFY: the smoothed classifier's accuracy, without radii (predict.tsv)."))
    n0: int = setting(100, help="Samples that pick the top class.")
    n: int = setting(10000, help="Samples that bound its probability (the largest certifiable radius grows with n).")
    alpha: float = setting(0.001, help="Failure probability of each certificate.")
    batch: int = setting(500, runtime=True, help="Noise samples per pipeline call (does not change any result).")
    noise_device: str = setting("", runtime=True, help=(
        "Where the noise is drawn: '' (the --device: on the GPU, nothing crosses the bus), or cpu (copied over: the "
        "same samples as a CPU run, to compare devices). A resumed run keeps the device its noise started on."))
    skip: int = setting(1, help="Certify every SKIP-th test image (Cohen: every 100th ImageNet image).")
    radii: tuple[float, ...] = setting((0.0, 0.25, 0.5, 0.75), help="Radii of the certified-accuracy table.")
    out: Path = setting(Path("runs/defense/certify"), kind="path", runtime=True, help=(
        "Run folder; OUT/NAME/certify.tsv, appended per image (--resume continues it)."))

    def names(self) -> list[str]:
        """The pipelines this run certifies, in order."""
        every = ["none", *self.denoisers]
        return [n for n in every if n in self.pipelines] if self.pipelines else every

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n0 < 1 or self.n < 1 or not 0 < self.alpha < 1 or self.skip < 1 or self.batch < 1:
            raise ConfigError("need n0, n, skip, batch >= 1 and 0 < alpha < 1.")
        for name, source in self.denoisers.items():
            if name == "none":
                raise ConfigError("`none` names the classifier alone; do not name a denoiser `none`.")
            _check_source(f"denoiser {name}", source)
        unknown = [p for p in self.pipelines if p != "none" and p not in self.denoisers]
        if unknown:
            raise ConfigError(f"--pipelines {unknown[0]!r} is neither none nor a --denoisers name "
                              f"({', '.join(self.denoisers) or 'none given'}).")
        if self.noise_device not in ("", "cpu") and not self.noise_device.startswith("cuda"):
            raise ConfigError(f"--noise-device must be '' (the --device), cpu or cuda[:N], got {self.noise_device!r}.")


def _check_source(what: str, source: Any) -> None:
    """A denoiser source must be a file or a reference (checked before anything runs)."""
    text = str(source)
    if Path(text).is_file() or is_reference(text):
        return
    raise ConfigError(f"{what}: {text} does not exist (train it with `bbzo defense pretrain` or `bbzo defense "
                      "finetune`, or name a TorchScript / torch.export file or a module:attr).")
