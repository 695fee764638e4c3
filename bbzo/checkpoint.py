"""Atomic, resumable checkpoints (loaded with ``torch.load(weights_only=True)``), with a recovery copy.

A checkpoint holds everything that decides the rest of a run: model, optimizer, scheduler, estimator
state, every RNG state (python, numpy, torch CPU, CUDA), the step, the query ledger and the elapsed
time. It is written to a temporary file in the same folder, flushed and fsynced, then renamed over the
target, so a crash never leaves a half-written checkpoint under the real name. The checkpoint it
replaces is kept as ``<name>.prev.pt``: if the newest file is damaged later (a full disk, a bad copy),
:func:`load_checkpoint` falls back to the previous one and says so -- one damaged file loses at most
``checkpoint_every`` steps, never the run.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import warnings
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from .errors import CheckpointError

__all__ = ["load_weights", "save_checkpoint", "load_checkpoint", "capture_rng", "restore_rng", "atomic_write_bytes",
           "previous_path", "CHECKPOINT_NAME", "RecoveredCheckpointWarning"]

FORMAT = 1
CHECKPOINT_NAME = "checkpoint.pt"


class RecoveredCheckpointWarning(UserWarning):
    """The newest checkpoint was unreadable; the run resumes from the previous one."""


def capture_rng() -> dict[str, Any]:
    """All RNG states as tensors / plain python values (no pickled objects)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def previous_path(path: Union[str, Path]) -> Path:
    """``run/checkpoint.pt`` -> ``run/checkpoint.prev.pt`` (the recovery copy)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def atomic_write_bytes(path: Union[str, Path], write: Any, keep_previous: bool = False) -> None:
    """Call ``write(fileobj)`` on a temp file next to ``path``, fsync, then rename over ``path``.

    ``keep_previous``: first move an existing ``path`` to :func:`previous_path` (the recovery copy).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_checkpoint(path: Union[str, Path], payload: dict[str, Any], keep_previous: bool = True) -> Path:
    """Write ``payload`` (tensors, numbers, strings, lists, dicts) atomically to ``path``.

    The file it replaces is kept as the recovery copy (``keep_previous``).
    """
    payload = {"format": FORMAT, **payload}
    atomic_write_bytes(path, lambda f: torch.save(payload, f), keep_previous=keep_previous)
    return Path(path)


def _read(path: Path, map_location: Any) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message would suggest weights_only=False, i.e. running the file's code: never
        raise CheckpointError(
            f"{path} holds Python objects that are not tensors, numbers or containers, so it was not written "
            "by bbzo (bbzo loads checkpoints with weights_only=True and never runs code from a file). Pass the "
            "checkpoint.pt of a bbzo run folder."
        ) from None
    except Exception as e:  # truncated / corrupt / not a torch file
        kind = "truncated or corrupt" if isinstance(e, (RuntimeError, EOFError, OSError)) else "unreadable"
        raise CheckpointError(
            f"checkpoint {path} is {kind} ({type(e).__name__}). It was damaged after writing (bbzo writes "
            "atomically) or is not a checkpoint. Restore a copy, or restart the run with --overwrite."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a bbzo checkpoint (format {FORMAT}).")
    return payload


def load_weights(path: Union[str, Path], map_location: Any = "cpu", what: str = "weights") -> Any:
    """``torch.load(path, weights_only=True)`` with an error that says what to do, never "set weights_only=False".

    Raises :class:`CheckpointError` for a missing, truncated or foreign file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no {what} at {path}.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} holds Python objects that are not tensors, numbers or containers, so it is not "
                              f"{what} written by bbzo (bbzo never runs code from a file). Save plain tensors "
                              "(torch.save(model.state_dict(), path)) or use safetensors.") from None
    except Exception as e:  # truncated / corrupt / not a torch file
        raise CheckpointError(f"{what} file {path} is truncated, corrupt or not a torch file ({type(e).__name__}). "
                              "Restore a copy, or produce it again.") from None


def load_checkpoint(path: Union[str, Path], map_location: Any = "cpu", allow_previous: bool = True) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); a clear :class:`CheckpointError` otherwise.

    ``path`` may be the file or the run folder. If the file is missing or unreadable and its recovery
    copy loads, that copy is returned (with a :class:`RecoveredCheckpointWarning`, and
    ``payload["recovered_from"]`` naming the damaged file).
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    prev = previous_path(path)
    if not path.exists():
        if allow_previous and prev.exists():
            payload = _read(prev, map_location)
            warnings.warn(f"{path} is missing; resuming from the recovery copy {prev.name} (step "
                          f"{payload.get('step')}).", RecoveredCheckpointWarning, stacklevel=2)
            return {**payload, "recovered_from": str(path)}
        raise CheckpointError(f"no checkpoint at {path}. Pass the checkpoint file or the run folder that holds "
                              f"{CHECKPOINT_NAME}.")
    try:
        return _read(path, map_location)
    except CheckpointError as e:
        if not (allow_previous and prev.exists()):
            raise
        try:
            payload = _read(prev, map_location)
        except CheckpointError:
            raise e from None
        warnings.warn(f"{e} Resuming from the recovery copy {prev.name} (step {payload.get('step')}) instead.",
                      RecoveredCheckpointWarning, stacklevel=2)
        return {**payload, "recovered_from": str(path)}
