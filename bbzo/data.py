"""Resumable minibatch sources: the batch of step ``t`` is a pure function of ``(seed, t)``.

A resumed run therefore sees exactly the batches the uninterrupted run would have seen, with no
iterator state to checkpoint.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

import torch

from .errors import ConfigError, ShapeError

__all__ = ["BatchSource", "TensorBatches"]


class BatchSource(Protocol):
    def get_batch(self, step: int) -> tuple[Any, Any]:
        """``(inputs, targets)`` of step ``step``."""


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
        self.steps_per_epoch = inputs.shape[0] // batch_size
        self._perm_epoch = -1
        self._perm: Optional[torch.Tensor] = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            n = self.inputs.shape[0]
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = torch.randperm(n, generator=g)
            else:
                self._perm = torch.arange(n)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def get_batch(self, step: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        epoch, i = divmod(step, self.steps_per_epoch)
        idx = self._permutation(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
        x = self.inputs[idx]
        y = self.targets[idx] if self.targets is not None else None
        if self.device is not None:
            x = x.to(self.device)
            y = y.to(self.device) if y is not None else None
        return x, y
