"""Atomic, resumable checkpoints (loaded with ``torch.load(weights_only=True)``).

A checkpoint holds everything that decides the rest of a run: model, optimizer, scheduler, estimator
state, every RNG state (python, numpy, torch CPU, CUDA), the step and query counters. It is written to
a temporary file in the same folder, flushed and fsynced, then renamed over the target, so a crash
never leaves a half-written checkpoint under the real name.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from .errors import CheckpointError

__all__ = ["save_checkpoint", "load_checkpoint", "capture_rng", "restore_rng", "atomic_write_bytes"]

FORMAT = 1


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


def atomic_write_bytes(path: Union[str, Path], write: Any) -> None:
    """Call ``write(fileobj)`` on a temp file next to ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_checkpoint(path: Union[str, Path], payload: dict[str, Any]) -> Path:
    """Write ``payload`` (tensors, numbers, strings, lists, dicts) atomically to ``path``."""
    payload = {"format": FORMAT, **payload}
    atomic_write_bytes(path, lambda f: torch.save(payload, f))
    return Path(path)


def load_checkpoint(path: Union[str, Path], map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); a clear :class:`CheckpointError` otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}. Pass the checkpoint file or the run folder that holds checkpoint.pt.")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated / corrupt / not a torch file / unsafe pickle
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {str(e)[:200]}). It was not "
            "written by bbzo or was damaged after writing (bbzo writes atomically). Restore a copy or "
            "restart the run."
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a bbzo checkpoint (format {FORMAT}).")
    return payload
