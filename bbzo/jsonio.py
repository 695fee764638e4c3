"""Strict JSON for every file bbzo writes: no bare ``NaN`` / ``Infinity`` (strict parsers reject them).

A non-finite float becomes ``null``; anything else JSON does not know becomes its ``str``. Files are written
atomically (:func:`bbzo.checkpoint.atomic_write_bytes`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Union

__all__ = ["strict", "dumps", "write_json"]


def strict(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (recursively through dicts, lists and tuples)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    """``json.dumps`` that never writes NaN/Infinity (see :func:`strict`); unknown types become their ``str``."""
    kw.setdefault("default", str)
    return json.dumps(strict(obj), allow_nan=False, **kw)


def write_json(path: Union[str, Path], data: Any, indent: int = 1) -> Path:
    """Write ``data`` as strict JSON to ``path``, atomically."""
    from .checkpoint import atomic_write_bytes

    text = dumps(data, indent=indent) + "\n"
    path = Path(path)
    atomic_write_bytes(path, lambda f: f.write(text.encode()))
    path.chmod(0o644)
    return path
