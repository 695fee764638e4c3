"""CIFAR-style image classification data from a user's disk (nothing is downloaded).

:func:`load_image_classification` reads

* an ``.npz`` with ``train_x``/``train_y`` (and optionally ``test_x``/``test_y``; the layout of
  ``../shared/data/cifar10_subset.npz``), ``x_train``/``y_train``/``x_val``/``y_val`` (Imagenette), or
  ``inputs``/``targets``; images NHWC uint8 or NCHW float;
* the official CIFAR-10 python layout: a folder ``cifar-10-batches-py`` (or its parent) with
  ``data_batch_1..5`` and ``test_batch``, read with a restricted unpickler that only rebuilds numpy
  arrays (no arbitrary code).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from bbzo.errors import ConfigError

__all__ = ["load_image_classification", "class_balanced_subset", "CIFAR_MEAN", "CIFAR_STD"]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
_NPZ_KEYS = (("train_x", "train_y", "test_x", "test_y"), ("x_train", "y_train", "x_val", "y_val"),
             ("inputs", "targets", None, None))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("builtins", "bytes")}

    def find_class(self, module: str, name: str):  # type: ignore[override]
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = _NumpyOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as e:  # noqa: BLE001 - any failure here means a corrupt or foreign file
        raise ConfigError(f"{path} is not a CIFAR-10 python batch ({type(e).__name__}: {e}).") from e
    return x, y


def _to_tensor(x: np.ndarray, normalize: bool) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.dim() == 4 and t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3):
        t = t.permute(0, 3, 1, 2)
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    if normalize and t.dim() == 4 and t.shape[1] == 3:
        t = (t - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return t.contiguous()


def load_image_classification(path: Union[str, Path], split: str = "train", normalize: bool = True
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (N, C, H, W) float32, labels (N,) int64)`` of ``split`` ("train" or "test")."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"dataset {path} does not exist. Pass an .npz (train_x/train_y, ...) or a "
                          "cifar-10-batches-py folder; bbzo never downloads data.")
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}.")
    if path.is_dir():
        folder = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
        files = [folder / f"data_batch_{i}" for i in range(1, 6)] if split == "train" else [folder / "test_batch"]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"{folder} is not a cifar-10-batches-py folder: missing {', '.join(missing)}.")
        parts = [_read_batch(f) for f in files]
        return _to_tensor(np.concatenate([p[0] for p in parts]), normalize), torch.from_numpy(np.concatenate([p[1] for p in parts]))
    try:
        d = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{path} is not a readable .npz file ({type(e).__name__}: {e}).") from e
    for kx, ky, tx, ty in _NPZ_KEYS:
        if kx in d.files and ky in d.files:
            if split == "test":
                if tx is None or tx not in d.files:
                    raise ConfigError(f"{path} has no test split ({tx}/{ty}).")
                kx, ky = tx, ty
            return _to_tensor(d[kx], normalize), torch.from_numpy(np.asarray(d[ky]).astype(np.int64))
    raise ConfigError(f"{path} has arrays {d.files}; expected train_x/train_y, x_train/y_train or inputs/targets.")


def class_balanced_subset(labels: torch.Tensor, per_class: int, seed: Optional[int] = None) -> torch.Tensor:
    """Indices of the first (or, with ``seed``, random) ``per_class`` samples of each class."""
    out = []
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        if g is not None:
            idx = idx[torch.randperm(idx.numel(), generator=g)]
        out.append(idx[:per_class])
    return torch.cat(out)
