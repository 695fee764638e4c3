"""Resumable minibatch sources: the batch of step ``t`` is a pure function of ``(seed, t)``.

A resumed run therefore sees exactly the batches the uninterrupted run would have seen, with no
iterator state to checkpoint.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

import torch

from .errors import ConfigError, ShapeError

__all__ = ["BatchSource", "TensorBatches", "EpochOrder"]


class BatchSource(Protocol):
    def get_batch(self, step: int) -> tuple[Any, Any]:
        """``(inputs, targets)`` of step ``step``."""


class EpochOrder:
    """Which of ``n`` rows make step ``t``'s batch: a fresh permutation per epoch from ``(seed, epoch)``.

    The last partial batch of an epoch is dropped. ``indices(step)`` is a pure function of ``(seed, step)``.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        self.n, self.batch_size, self.seed, self.shuffle = int(n), int(batch_size), int(seed), shuffle
        self.steps_per_epoch = self.n // self.batch_size
        self._perm: Optional[tuple[int, torch.Tensor]] = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = (epoch, torch.randperm(self.n, generator=g))
            else:
                self._perm = (epoch, torch.arange(self.n))
        return self._perm[1]

    def indices(self, step: int) -> torch.Tensor:
        """The rows of ``step``'s batch ``(batch_size,)``."""
        epoch, i = divmod(step, self.steps_per_epoch)
        return self.permutation(epoch)[i * self.batch_size:(i + 1) * self.batch_size]


class TensorBatches:
    """Shuffled minibatches of in-memory tensors; a fresh permutation per epoch from ``(seed, epoch)``.

    Args:
        inputs: ``(N, ...)``.
        targets: ``(N, ...)`` or None.
        batch_size: Rows per batch (the last partial batch of an epoch is dropped).
        seed: Shuffling seed.
        shuffle: Shuffle each epoch.
        device: Move each batch there.
    """

    def __init__(self, inputs: torch.Tensor, targets: Optional[torch.Tensor], batch_size: int,
                 seed: int = 0, shuffle: bool = True, device: Any = None) -> None:
        if targets is not None and targets.shape[0] != inputs.shape[0]:
            raise ShapeError(f"inputs have {inputs.shape[0]} rows but targets {targets.shape[0]}.")
        if not 1 <= batch_size <= inputs.shape[0]:
            raise ConfigError(f"batch_size must be in [1, {inputs.shape[0]}] for {inputs.shape[0]} samples, got {batch_size}.")
        self.inputs, self.targets = inputs, targets
        self.batch_size, self.seed, self.shuffle, self.device = batch_size, seed, shuffle, device
        self.order = EpochOrder(inputs.shape[0], batch_size, seed, shuffle)
        self.steps_per_epoch = self.order.steps_per_epoch

    def get_batch(self, step: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        idx = self.order.indices(step)
        x = self.inputs[idx]
        y = self.targets[idx] if self.targets is not None else None
        if self.device is not None:
            x = x.to(self.device)
            y = y.to(self.device) if y is not None else None
        return x, y
