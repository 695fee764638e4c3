"""Load a Python object named on the command line: ``pkg.mod:attr`` or ``path/to/file.py:attr``.

This is how ``bbzo train --oracle mypkg.sim:Simulator --model mypkg.net:build`` finds user code. The
file form means a user does not need to install their package: ``examples/heater/model.py:build``
imports that file directly. Every failure is a :class:`~bbzo.errors.ConfigError` that says which part
of the reference is wrong (no module, no file, no attribute) and how to fix it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["load_object", "is_reference", "split_reference"]


def is_reference(text: str) -> bool:
    """Whether ``text`` looks like ``module:attr`` / ``file.py:attr`` (as opposed to a name or a path)."""
    return ":" in text and not text.endswith(":") and not text.startswith(":")


def split_reference(ref: str) -> tuple[str, str]:
    """``"a.b:c.d"`` -> ``("a.b", "c.d")``; the last ``:`` splits, so file paths may hold ``:``."""
    if not isinstance(ref, str) or not is_reference(ref.strip()):
        raise ConfigError(
            f"{ref!r} is not a reference. Use 'package.module:attribute' (an importable module) or "
            "'path/to/file.py:attribute' (a file), e.g. 'mypkg.sim:Simulator' or 'examples/sim.py:simulate'."
        )
    module, attr = ref.strip().rsplit(":", 1)
    return module, attr


def _looks_like_file(module: str) -> bool:
    return module.endswith(".py") or "/" in module or os.sep in module


def _where(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    return f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""


def _import_file(module: str, ref: str) -> Any:
    path = Path(module).expanduser()
    if not path.is_file():
        raise ConfigError(f"reference {ref!r}: file {str(path)!r} not found (relative paths start at the "
                          f"current folder, {os.getcwd()}).")
    path = path.resolve()
    # one module per file, whatever path spelling: --model and --data from the same file share state
    name = f"bbzo_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"reference {ref!r}: cannot import {str(path)!r} as Python (is it a .py file?).")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses, pickling and relative lookups need the module registered
    try:
        spec.loader.exec_module(mod)
    except Exception as e:
        del sys.modules[name]
        raise ConfigError(f"reference {ref!r}: importing {path.name} raised {type(e).__name__}{_where(e)}: {e}") from e
    return mod


def _import_module(module: str, ref: str) -> Any:
    # like uvicorn/gunicorn: the current folder is importable, also from the installed `bbzo` script
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if module == missing or module.startswith(missing + "."):
            raise ConfigError(
                f"reference {ref!r}: no module named {missing!r}. Install the package (pip install -e .), "
                f"run from the folder that holds it, add it to PYTHONPATH, or name the file instead: "
                f"'path/to/{module.replace('.', '/')}.py:attribute'."
            ) from e
        raise ConfigError(f"reference {ref!r}: importing {module!r} failed: {e} (a dependency of your module "
                          "is missing).") from e
    except Exception as e:
        raise ConfigError(f"reference {ref!r}: importing {module!r} raised {type(e).__name__}{_where(e)}: {e}") from e


def load_object(ref: str) -> Any:
    """The object named by ``ref``: ``"pkg.mod:attr"``, ``"pkg.mod:Class.attr"`` or ``"dir/file.py:attr"``.

    Raises:
        ConfigError: not a reference, the module or file is not found or fails to import, or the
            attribute does not exist (the message lists what the module does define).
    """
    module, attr = split_reference(ref)
    mod = _import_file(module, ref) if _looks_like_file(module) else _import_module(module, ref)
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(obj) if not n.startswith("_") and not inspect.ismodule(getattr(obj, n, None))
                            and type(getattr(obj, n, None)).__name__ != "_Feature")  # from __future__ import ...
            shown = ", ".join(public[:15]) + (" ..." if len(public) > 15 else "")
            raise ConfigError(f"reference {ref!r}: {module!r} has no attribute {attr!r}"
                              f"{f' (it defines: {shown})' if public else ''}.")
        obj = getattr(obj, part)
    return obj
