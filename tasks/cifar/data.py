"""CIFAR-10 for training: the splits from a user's disk, and minibatches that are a function of (seed, step).

:func:`load_data` reads the train and test splits with :func:`~bbzo.tasks.cifar.readers.load_image_classification`
(an ``.npz`` or the official ``cifar-10-batches-py`` folder), optionally keeps a class-balanced subset,
and returns images in ``[0, 1]`` (normalization happens per batch, after augmentation).

:class:`CifarBatches` is the trainer's :class:`~bbzo.data.BatchSource`: epoch ``e`` visits the training
set in a permutation drawn from ``(seed, e)``; the augmentation of step ``s`` (random crop with 4 px zero
padding, horizontal flip: torchvision's ``transforms.v2`` functionals) draws its parameters from
``(seed, s)``. So ``get_batch(step)`` depends on nothing else and a resumed run sees exactly the batches
it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from bbzo.data import EpochOrder
from bbzo.errors import ConfigError

from .readers import CIFAR_MEAN, CIFAR_STD, class_balanced_subset, load_image_classification

__all__ = ["CifarData", "CifarBatches", "load_data", "CIFAR10_CLASSES", "normalize"]

#: Seed of the held-out validation images (the same split whatever the run's seed).
VAL_SPLIT_SEED = 20_240_331

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class CifarData:
    """``train_x (N, 3, 32, 32)`` / ``test_x`` float32 in [0, 1], labels int64, class names."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _subset(x: torch.Tensor, y: torch.Tensor, n: int, seed: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not n or n >= x.shape[0]:
        return x, y
    k = int(torch.unique(y).numel())
    if n % k:
        raise ConfigError(f"{what} subset must be a multiple of the {k} classes (class-balanced), got {n}.")
    idx = class_balanced_subset(y, n // k, seed=seed).sort().values
    if idx.numel() < n:
        raise ConfigError(f"{what}: a class has fewer than {n // k} images; choose a smaller subset.")
    return x[idx].contiguous(), y[idx].contiguous()


def _class_names(path: Path, k: int) -> tuple[str, ...]:
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as d:
                for key in ("classes", "class_names"):
                    if key in d.files and len(d[key]) == k:
                        return tuple(str(c) for c in d[key])
        except Exception:  # noqa: BLE001 - the names are cosmetic; the reader reports real problems
            pass
    return CIFAR10_CLASSES if k == 10 else tuple(str(i) for i in range(k))


def load_data(path: Any, subset: int = 0, test_subset: int = 0, seed: int = 0, val_images: int = 0) -> CifarData:
    """Both splits of ``path`` in [0, 1]; ``subset`` / ``test_subset``: class-balanced random subsets (0: all).

    ``val_images``: hold out that many class-balanced training images (after ``subset``; the same images for every
    run seed) and return them as the evaluation split in place of the test images (a screen that never sees the
    test set).
    """
    if path is None:
        raise ConfigError("no dataset given: pass --data PATH (a cifar-10-batches-py folder or an .npz with "
                          "train_x/train_y/test_x/test_y, e.g. ../shared/data/cifar10_subset.npz); bbzo never "
                          "downloads data.")
    path = Path(path)
    tx, ty = load_image_classification(path, "train", normalize=False)
    vx, vy = load_image_classification(path, "test", normalize=False)
    for x, y, split in ((tx, ty, "train"), (vx, vy, "test")):
        if x.dim() != 4 or x.shape[1] != 3:
            raise ConfigError(f"{path}: {split} images have shape {tuple(x.shape)}; expected (N, 3, H, W) RGB.")
        if y.shape != (x.shape[0],):
            raise ConfigError(f"{path}: {split} has {x.shape[0]} images but {tuple(y.shape)} labels.")
    k = int(max(int(ty.max()), int(vy.max())) + 1)
    tx, ty = _subset(tx, ty, subset, seed, "train")
    if val_images:
        if val_images >= tx.shape[0] or val_images % k:
            raise ConfigError(f"val_images must be a multiple of the {k} classes and below the {tx.shape[0]} training "
                              f"images, got {val_images}.")
        held = class_balanced_subset(ty, val_images // k, seed=VAL_SPLIT_SEED)
        if held.numel() != val_images:
            raise ConfigError(f"val_images: a class has fewer than {val_images // k} training images; hold out fewer.")
        keep = torch.ones(tx.shape[0], dtype=torch.bool)
        keep[held] = False
        held = held.sort().values
        vx, vy = tx[held].contiguous(), ty[held].contiguous()
        tx, ty = tx[keep].contiguous(), ty[keep].contiguous()
        return CifarData(tx, ty, vx, vy, _class_names(path, k), f"{path} (validation: {val_images} held-out training images)")
    vx, vy = _subset(vx, vy, test_subset, seed + 1, "test")
    return CifarData(tx, ty, vx, vy, _class_names(path, k), str(path))


def normalize(x: torch.Tensor, mean: Sequence[float] = CIFAR_MEAN, std: Sequence[float] = CIFAR_STD) -> torch.Tensor:
    """Per-channel standardization of ``(N, 3, H, W)`` images in [0, 1]."""
    return TF.normalize(x, list(mean), list(std))


class CifarBatches:
    """Shuffled, augmented, normalized minibatches; ``get_batch(step) -> (images (B, 3, H, W), labels (B,))``.

    Args:
        images: ``(N, 3, H, W)`` in [0, 1]; ``labels``: ``(N,)``.
        batch_size: Images per step (an epoch drops the last partial batch).
        seed: Seed of the epoch permutations and of the augmentation.
        augment: Random crop (``pad`` px of zero padding) and horizontal flip.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, seed: int = 0,
                 augment: bool = True, pad: int = 4, device: Any = None) -> None:
        n = images.shape[0]
        if not 1 <= batch_size <= n:
            raise ConfigError(f"batch must be in [1, {n}] for {n} training images, got {batch_size}.")
        self.images, self.labels = images, labels
        self.batch_size, self.seed, self.augment, self.pad, self.device = batch_size, seed, augment, pad, device
        self.order = EpochOrder(n, batch_size, seed)
        self.steps_per_epoch = self.order.steps_per_epoch

    def indices(self, step: int) -> torch.Tensor:
        """The training-set rows of ``step``'s batch."""
        return self.order.indices(step)

    def _augment(self, x: torch.Tensor, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed + 1) * 7_919_000_003 + step)
        b, _, h, w = x.shape
        tops = torch.randint(0, 2 * self.pad + 1, (b,), generator=g).tolist()
        lefts = torch.randint(0, 2 * self.pad + 1, (b,), generator=g).tolist()
        flips = (torch.rand(b, generator=g) < 0.5).tolist()
        padded = TF.pad(x, [self.pad], fill=0.0)
        out = []
        for k in range(b):
            img = TF.crop(padded[k], tops[k], lefts[k], h, w)
            out.append(TF.horizontal_flip(img) if flips[k] else img)
        return torch.stack(out)

    def get_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.indices(step)
        x, y = self.images[idx], self.labels[idx]
        if self.augment:
            x = self._augment(x, step)
        x = normalize(x).contiguous()
        if self.device is not None:
            x, y = x.to(self.device), y.to(self.device)
        return x, y


def prepare_run(s: Any, run: Any) -> CifarData:
    """The run's data, loaded once for every method (the task's ``prepare``)."""
    from bbzo.listeners import activity

    with activity(f"loading {s.data}", enabled=run.progress, what="both splits, class-balanced subsets"):
        return load_data(s.data, s.subset, s.test_subset, s.seed, val_images=s.val_images)
