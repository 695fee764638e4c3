"""Images for the defense: the splits from a user's file, and noisy minibatches that are a function of (seed, step).

The images come through the CIFAR readers (an ``.npz`` with ``x_train/y_train/x_val/y_val`` such as
../shared/data/imagenette_32px.npz, or ``train_x/...``, or a ``cifar-10-batches-py`` folder), in ``[0, 1]``.
Gaussian noise is added in pixel space (before any normalization), so sigma and the certified radii are in
``[0, 1]`` pixel units. One noise draw per (image, step), shared by the base query and every perturbed query
of that step (otherwise the finite differences would measure the noise).
"""

from __future__ import annotations

from typing import Optional

import torch

from bbzo.data import EpochOrder
from bbzo.errors import ConfigError
from bbzo.tasks.cifar.data import CifarData, load_data

__all__ = ["NoisyBatches", "load_images", "CifarData"]


#: both splits in [0, 1], class-balanced random subsets when ``subset`` / ``test_subset`` > 0 (the CIFAR readers)
load_images = load_data


class NoisyBatches:
    """``get_batch(step) -> (x + delta (B, C, H, W), targets[idx])`` with ``delta ~ N(0, sigma^2)``.

    Args:
        images: ``(N, C, H, W)`` in [0, 1].
        targets: ``(N, ...)``: the clean images (denoising) or ``argmax f(x)`` labels (stability); None: the images.
        batch_size: Images per step (an epoch drops the last partial batch).
        sigma: Noise level in pixel units.
        seed: The batch order (a fresh permutation per epoch) and the noise both follow (seed, step).
    """

    def __init__(self, images: torch.Tensor, targets: Optional[torch.Tensor], batch_size: int, sigma: float,
                 seed: int = 0, device: Optional[str] = None) -> None:
        n = int(images.shape[0])
        if not 1 <= batch_size <= n:
            raise ConfigError(f"batch must be in [1, {n}] for {n} training images, got {batch_size}.")
        if sigma < 0:
            raise ConfigError(f"sigma must be >= 0, got {sigma}.")
        if targets is not None and targets.shape[0] != n:
            raise ConfigError(f"{n} images but {targets.shape[0]} targets.")
        self.images, self.targets = images, targets
        self.batch_size, self.sigma, self.seed, self.device = batch_size, float(sigma), int(seed), device
        self.order = EpochOrder(n, batch_size, seed)
        self.steps_per_epoch = self.order.steps_per_epoch

    def get_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.order.indices(step)
        x = self.images[idx]
        g = torch.Generator().manual_seed((self.seed + 7919) * 1_000_003 + int(step))
        noisy = x + self.sigma * torch.randn(x.shape, generator=g, dtype=x.dtype)
        y = x if self.targets is None else self.targets[idx]
        return noisy.to(self.device), y.to(self.device)
