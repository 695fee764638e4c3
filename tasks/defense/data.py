"""Images for the defense: a user's splits read lazily, and noisy minibatches that are a function of (seed, step).

Two layouts, one interface (:class:`ImageSplit`: ``split[i] -> (image (C, H, W) float32 in [0, 1], label)``):

* an **image folder** in torchvision's ``ImageFolder`` layout, ``DATA/train/<class>/*.JPEG`` and
  ``DATA/val/<class>/*`` (``test/`` also works), as ImageNet ships. Each image is decoded when it is used,
  resized so that its shorter side is ``image_size / crop_pct`` and centre-cropped to ``image_size``
  (224 and 0.875: the standard Resize(256) + CenterCrop(224)), in DataLoader worker processes with pinned
  memory when the device is CUDA. Classes are the sub-folders of ``train/`` in sorted order (torchvision's
  rule; ``val/`` alone when there is no ``train/``), and the run records them;
* an **array file**: an ``.npz`` with ``x_train/y_train/x_val/y_val`` (../shared/data/imagenette_32px.npz),
  ``train_x/train_y/test_x/test_y``, or a ``cifar-10-batches-py`` folder. Only the splits a command uses are
  read, kept as uint8, and turned into float32 per batch (``/ 255``: the same numbers as before).

``subset`` / ``test_subset`` pick class-balanced random rows from the labels alone (no image is read), so
``bbzo defense certify`` reads exactly the test images it certifies.

Gaussian noise is added in pixel space (before any normalization), so sigma and the certified radii are in
``[0, 1]`` pixel units. One noise draw per (image, step), shared by the base query and every perturbed query
of that step (otherwise the finite differences would measure the noise).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from bbzo.data import EpochOrder
from bbzo.errors import ConfigError
from bbzo.tasks.cifar.data import CifarData, load_data
from bbzo.tasks.cifar.readers import class_balanced_subset, load_image_classification

__all__ = ["NoisyBatches", "load_images", "CifarData", "ImageSplit", "ArraySplit", "FolderSplit", "ImageData",
           "open_images", "iter_rows", "IMAGE_SUFFIXES"]

#: both splits as float32 tensors (the CIFAR readers; kept for scripts that want everything in memory)
load_images = load_data

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_NPZ_KEYS = (("train_x", "train_y", "test_x", "test_y"), ("x_train", "y_train", "x_val", "y_val"))
_TEST_FOLDERS = ("val", "test")


class ImageSplit(torch.utils.data.Dataset):
    """One split: ``split[i] -> (image (C, H, W) float32 in [0, 1], label)``; ``labels`` ``(N,)`` int64.

    ``in_memory`` splits also answer ``rows_batch(rows) -> (B, C, H, W)`` without a DataLoader.
    """

    labels: torch.Tensor
    in_memory: bool = False
    source: str = ""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def image_shape(self) -> tuple[int, ...]:
        return tuple(self[0][0].shape)


class ArraySplit(ImageSplit):
    """Images held as an array (``(N, H, W, C)`` uint8 or ``(N, C, H, W)`` uint8/float), converted per batch.

    Args:
        images: The array, or a function that reads it (called on first use: an ``.npz`` member is read only
            after every other check has passed).
        labels: ``(N,)``.
        shape: The array's shape when ``images`` is a function.
    """

    in_memory = True

    def __init__(self, images: Any, labels: Any, source: str = "", shape: Optional[Sequence[int]] = None) -> None:
        if callable(images):
            self._read, self._images, shape = images, None, tuple(shape or ())
        else:
            x = images.numpy() if isinstance(images, torch.Tensor) else images
            self._read, self._images, shape = None, x, tuple(x.shape)
        if len(shape) != 4:
            raise ConfigError(f"{source}: images have shape {shape}; expected (N, H, W, 3) or (N, 3, H, W).")
        self.shape = shape
        self.nhwc = shape[-1] in (1, 3) and shape[1] not in (1, 3)
        if (shape[-1] if self.nhwc else shape[1]) != 3:
            raise ConfigError(f"{source}: images have shape {shape}; expected RGB (3 channels).")
        self.labels = torch.as_tensor(np.asarray(labels)).long()
        if self.labels.shape != (shape[0],):
            raise ConfigError(f"{source}: {shape[0]} images but labels of shape {tuple(self.labels.shape)}.")
        self.source = source

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            assert self._read is not None
            self._images = self._read()
        return self._images

    def _convert(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x))
        if self.nhwc:
            t = t.permute(0, 3, 1, 2)
        return (t.float() / 255.0 if t.dtype == torch.uint8 else t.float()).contiguous()

    def rows_batch(self, rows: Union[torch.Tensor, Sequence[int]]) -> torch.Tensor:
        """``(B, C, H, W)`` float32 of these rows, in this order."""
        idx = np.asarray(rows.tolist() if isinstance(rows, torch.Tensor) else list(rows), dtype=np.int64)
        return self._convert(self.images[idx])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self._convert(self.images[int(i)][None])[0], int(self.labels[int(i)])

    def image_shape(self) -> tuple[int, ...]:
        s = self.shape
        return (s[3], s[1], s[2]) if self.nhwc else tuple(s[1:])


def _transform(image_size: int, crop_pct: float) -> Any:
    from torchvision import transforms
    return transforms.Compose([transforms.Resize(int(round(image_size / crop_pct))), transforms.CenterCrop(image_size),
                               transforms.ToTensor()])


class FolderSplit(ImageSplit):
    """One ``ImageFolder`` split, decoded lazily: ``root/<class>/<image>`` with the given class list.

    Args:
        root: The split's folder.
        classes: Class folder names in label order (a class without a folder here simply has no images).
        image_size, crop_pct: Resize the shorter side to ``image_size / crop_pct``, centre-crop ``image_size``.
    """

    def __init__(self, root: Path, classes: Sequence[str], image_size: int, crop_pct: float) -> None:
        from torchvision.datasets.folder import make_dataset
        self.root, self.classes = Path(root), list(classes)
        here = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        extra = [c for c in here if c not in self.classes]
        if extra:
            raise ConfigError(f"{self.root} has class folders that train/ has not: {', '.join(extra[:5])}. Every class "
                              "of the test split needs a folder in train/ (the labels are train/'s sorted folders).")
        index = {c: i for i, c in enumerate(self.classes)}
        present = {c: index[c] for c in here}
        self.samples = make_dataset(str(self.root), present, extensions=IMAGE_SUFFIXES, allow_empty=True)
        if not self.samples:
            raise ConfigError(f"{self.root} holds no images ({', '.join(IMAGE_SUFFIXES)}) in class folders.")
        self.labels = torch.tensor([y for _, y in self.samples], dtype=torch.long)
        self.transform = _transform(image_size, crop_pct)
        self.size = image_size
        self.source = str(self.root)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image
        path, y = self.samples[int(i)]
        try:
            with open(path, "rb") as f:
                img = Image.open(f).convert("RGB")
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: name it
            raise ConfigError(f"cannot decode image {path} ({type(e).__name__}: {e}); remove or replace it.") from e
        return self.transform(img), y

    def image_shape(self) -> tuple[int, ...]:
        return (3, self.size, self.size)


@dataclass
class ImageData:
    """The splits a command uses, the rows it uses of each (class-balanced subsets), and the class list.

    ``train`` is None for commands that only read the test split (``certify``).
    """

    test: ImageSplit
    test_rows: torch.Tensor
    classes: list[str]
    source: str
    layout: str
    train: Optional[ImageSplit] = None
    train_rows: Optional[torch.Tensor] = None
    class_names: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def image_shape(self) -> tuple[int, ...]:
        return self.test.image_shape()

    def describe(self) -> dict[str, Any]:
        """What a run records about its data."""
        out: dict[str, Any] = {"source": self.source, "layout": self.layout, "classes": self.classes,
                               "image_shape": list(self.image_shape()), "test_images": int(self.test_rows.numel())}
        if self.class_names and self.class_names != self.classes:
            out["class_names"] = self.class_names
        if self.train_rows is not None:
            out["train_images"] = int(self.train_rows.numel())
        return out


def _subset_rows(labels: torch.Tensor, n: int, seed: int, what: str) -> torch.Tensor:
    """Sorted rows of a class-balanced random subset of ``n`` (all rows when 0); the CIFAR readers' rule."""
    total = int(labels.shape[0])
    if not n or n >= total:
        return torch.arange(total)
    k = int(torch.unique(labels).numel())
    if n % k:
        raise ConfigError(f"{what} subset must be a multiple of the {k} classes (class-balanced), got {n}.")
    idx = class_balanced_subset(labels, n // k, seed=seed).sort().values
    if idx.numel() < n:
        raise ConfigError(f"{what}: a class has fewer than {n // k} images; choose a smaller subset.")
    return idx


def _folder_root(path: Path) -> tuple[Optional[Path], Path]:
    train = path / "train" if (path / "train").is_dir() else None
    for name in _TEST_FOLDERS:
        if (path / name).is_dir():
            return train, path / name
    raise ConfigError(f"{path} is a folder without val/ (or test/): an image folder needs DATA/train/<class>/*.jpg "
                      "and DATA/val/<class>/*.jpg (torchvision's ImageFolder layout, as ImageNet ships); a CIFAR "
                      "folder needs cifar-10-batches-py.")


def _is_cifar_folder(path: Path) -> bool:
    return (path / "cifar-10-batches-py").is_dir() or (path / "test_batch").is_file()


def _npz_shape(path: Path, key: str) -> tuple[int, ...]:
    """The shape of one ``.npz`` member, read from its header (not its data)."""
    with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0(f) if version == (1, 0) else np.lib.format.read_array_header_2_0(f)
    return tuple(header[0])


def _npz_member(path: Path, key: str) -> Any:
    def read() -> np.ndarray:
        with np.load(path, allow_pickle=False) as d:
            return d[key]
    return read


def _npz_splits(path: Path, splits: Sequence[str]) -> tuple[dict[str, ArraySplit], dict[str, list[str]]]:
    """Lazy splits of an ``.npz`` (labels and shapes now, images on first use) and its class-name arrays."""
    try:
        with np.load(path, allow_pickle=False) as d:
            files = list(d.files)
            keys = next(((kx, ky, tx, ty) for kx, ky, tx, ty in _NPZ_KEYS if kx in files and ky in files), None)
            if keys is None or keys[2] not in files or keys[3] not in files:
                raise ConfigError(f"{path} has arrays {files}; the defense needs x_train/y_train/x_val/y_val or "
                                  "train_x/train_y/test_x/test_y.")
            out: dict[str, ArraySplit] = {}
            for split in splits:
                kx, ky = (keys[0], keys[1]) if split == "train" else (keys[2], keys[3])
                labels = np.asarray(d[ky]).astype(np.int64)
                out[split] = ArraySplit(_npz_member(path, kx), labels, source=f"{path} ({split})",
                                        shape=_npz_shape(path, kx))
            names = {key: [str(c) for c in d[key]] for key in ("wnids", "classes", "class_names") if key in files}
            return out, names
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise ConfigError(f"{path} is not a readable .npz file ({type(e).__name__}: {e}). Write one with "
                          "numpy.savez(path, x_train=..., y_train=..., x_val=..., y_val=...).") from e


def open_images(path: Any, *, splits: Sequence[str] = ("train", "test"), subset: int = 0, test_subset: int = 0,
                seed: int = 0, image_size: int = 0, crop_pct: float = 0.875) -> ImageData:
    """The splits of ``path`` that a command needs (see the module docstring); no image is read yet.

    Args:
        splits: ``("train", "test")`` or ``("test",)``.
        subset, test_subset: Class-balanced random subsets of that many rows (0: all), from ``seed`` (train) and
            ``seed + 1`` (test), as :func:`bbzo.tasks.cifar.data.load_data` picks them.
        image_size: Image folders: the square size images are cropped to (0: 224). Array files are used at
            their stored size; a different nonzero ``image_size`` is an error.
    """
    if path is None:
        raise ConfigError("no dataset given: pass --data DIR (an ImageFolder root with train/ and val/) or --data "
                          "FILE.npz (x_train/y_train/x_val/y_val); bbzo never downloads data.")
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"dataset {path} does not exist. Pass an ImageFolder root (DIR/train/<class>/*.jpg, "
                          "DIR/val/<class>/*.jpg) or an .npz with x_train/y_train/x_val/y_val.")
    if not 0 < crop_pct <= 1:
        raise ConfigError(f"crop_pct must be in (0, 1], got {crop_pct} (0.875: Resize(256) + CenterCrop(224)).")
    want_train = "train" in splits
    names: list[str] = []
    if path.is_dir() and not _is_cifar_folder(path):
        train_root, test_root = _folder_root(path)
        if want_train and train_root is None:
            raise ConfigError(f"{path} has no train/ folder; training needs DATA/train/<class>/*.jpg.")
        base = train_root if train_root is not None else test_root
        classes = sorted(d.name for d in base.iterdir() if d.is_dir())
        if len(classes) < 2:
            raise ConfigError(f"{base} has {len(classes)} class folder(s); an ImageFolder needs one folder per class.")
        size = image_size or 224
        test: ImageSplit = FolderSplit(test_root, classes, size, crop_pct)
        train = FolderSplit(train_root, classes, size, crop_pct) if want_train and train_root is not None else None
        layout = "imagefolder"
    else:
        if path.is_dir():  # cifar-10-batches-py: small, read whole
            splits_here = {}
            for split in splits:
                x, y = load_image_classification(path, split, normalize=False)
                splits_here[split] = ArraySplit(x, y, source=f"{path} ({split})")
            known: dict[str, list[str]] = {}
        else:
            splits_here, known = _npz_splits(path, splits)
        test = splits_here["test"]
        train = splits_here.get("train")
        k = int(torch.cat([s.labels for s in splits_here.values()]).max()) + 1
        names = known.get("class_names") or known.get("classes") or []
        ids = known.get("wnids") or names
        classes = list(ids) if len(ids) >= k else [str(i) for i in range(k)]
        names = names if len(names) == len(classes) else []
        stored = test.image_shape()[1]
        if image_size and image_size != stored:
            raise ConfigError(f"{path} holds {stored} px images; --image-size {image_size} applies to image folders "
                              "only (resize the array file, or leave --image-size at 0).")
        layout = "arrays"
    for split, s in (("train", train), ("test", test)):
        if s is not None and len(s) and (int(s.labels.min()) < 0 or int(s.labels.max()) >= len(classes)):
            raise ConfigError(f"{path} ({split}): labels outside 0..{len(classes) - 1}.")
    test_rows = _subset_rows(test.labels, test_subset, seed + 1, "test")
    train_rows = _subset_rows(train.labels, subset, seed, "train") if train is not None else None
    return ImageData(test=test, test_rows=test_rows, classes=classes, source=str(path), layout=layout, train=train,
                     train_rows=train_rows, class_names=names or list(classes))


def _loader(split: ImageSplit, rows: torch.Tensor, batch: int, workers: int, pin: bool,
            batch_sampler: Any = None) -> torch.utils.data.DataLoader:
    kw: dict[str, Any] = {"num_workers": workers, "pin_memory": pin}
    if workers > 0:
        kw["persistent_workers"] = False
    if batch_sampler is not None:
        return torch.utils.data.DataLoader(split, batch_sampler=batch_sampler, **kw)
    return torch.utils.data.DataLoader(torch.utils.data.Subset(split, rows.tolist()), batch_size=batch, shuffle=False,
                                       **kw)


def iter_rows(split: ImageSplit, rows: torch.Tensor, batch: int, *, workers: int = 0, device: Any = "cpu"
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images (B, C, H, W), labels (B,))`` of ``rows`` in order, ``batch`` at a time (the last one shorter).

    In-memory splits are sliced directly; image folders stream through a DataLoader with ``workers``
    decoding processes (pinned memory when ``device`` is CUDA). Images stay on the CPU.
    """
    if split.in_memory:
        for i in range(0, int(rows.numel()), batch):
            r = rows[i:i + batch]
            yield split.rows_batch(r), split.labels[r]  # type: ignore[attr-defined]
        return
    pin = torch.device(device).type == "cuda"
    for x, y in _loader(split, rows, batch, workers, pin):
        yield x, y


class _StepSampler(torch.utils.data.Sampler):
    """The dataset rows of steps ``start, start + 1, ...`` (for a DataLoader that prefetches training batches)."""

    def __init__(self, order: EpochOrder, rows: torch.Tensor, start: int) -> None:
        self.order, self.rows, self.start = order, rows, start

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while True:
            yield self.rows[self.order.indices(step)].tolist()
            step += 1


class NoisyBatches:
    """``get_batch(step) -> (x + delta (B, C, H, W), targets)`` with ``delta ~ N(0, sigma^2)``.

    Args:
        images: An :class:`ImageSplit` (or a ``(N, C, H, W)`` tensor in [0, 1]).
        targets: ``(len(rows), ...)`` per used row: ``argmax f(x)`` labels (stability); None: the clean images
            (denoising).
        batch_size: Images per step (an epoch drops the last partial batch).
        sigma: Noise level in pixel units.
        seed: The batch order (a fresh permutation per epoch) and the noise both follow (seed, step).
        rows: The split's rows to train on (default: all).
        workers: DataLoader processes that decode the next batches of an image folder while a step runs.
    """

    def __init__(self, images: Union[ImageSplit, torch.Tensor], targets: Optional[torch.Tensor], batch_size: int,
                 sigma: float, seed: int = 0, device: Optional[str] = None, rows: Optional[torch.Tensor] = None,
                 workers: int = 0) -> None:
        split = images if isinstance(images, ImageSplit) else ArraySplit(images, torch.zeros(images.shape[0]))
        self.rows = rows if rows is not None else torch.arange(len(split))
        n = int(self.rows.numel())
        if not 1 <= batch_size <= n:
            raise ConfigError(f"batch must be in [1, {n}] for {n} training images, got {batch_size}.")
        if sigma < 0:
            raise ConfigError(f"sigma must be >= 0, got {sigma}.")
        if targets is not None and targets.shape[0] != n:
            raise ConfigError(f"{n} images but {targets.shape[0]} targets.")
        self.split, self.targets = split, targets
        self.batch_size, self.sigma, self.seed, self.device = batch_size, float(sigma), int(seed), device
        self.workers = workers
        self.order = EpochOrder(n, batch_size, seed)
        self.steps_per_epoch = self.order.steps_per_epoch
        self._it: Optional[Iterator[Any]] = None
        self._next = -1
        self._last: Optional[tuple[int, torch.Tensor]] = None

    def _images(self, step: int, idx: torch.Tensor) -> torch.Tensor:
        if self.split.in_memory:
            return self.split.rows_batch(self.rows[idx])  # type: ignore[attr-defined]
        if self._last is not None and self._last[0] == step:  # asked twice (a score's batch, then step 0)
            return self._last[1]
        if self._it is None or self._next != step:  # (re)start the prefetching loader at this step
            pin = self.device is not None and torch.device(self.device).type == "cuda"
            loader = _loader(self.split, self.rows, self.batch_size, self.workers, pin,
                             batch_sampler=_StepSampler(self.order, self.rows, step))
            self._it = iter(loader)
        self._next = step + 1
        x = next(self._it)[0]
        self._last = (step, x)
        return x

    def get_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.order.indices(step)
        x = self._images(step, idx)
        g = torch.Generator().manual_seed((self.seed + 7919) * 1_000_003 + int(step))
        noisy = x + self.sigma * torch.randn(x.shape, generator=g, dtype=x.dtype)
        y = x if self.targets is None else self.targets[idx]
        return noisy.to(self.device), y.to(self.device)
