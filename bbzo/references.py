"""User code named on the command line: models, data and oracles by reference.

A *reference* is ``pkg.mod:attr`` or ``path/to/file.py:attr``. This is how ``bbzo train --oracle
mypkg.sim:Simulator --model mypkg.net:build --data net.py:make_data`` finds user code; the file form
means a user does not need to install their package (``examples/custom_simulator/heater.py:build``
imports that file directly, and the file may import the modules next to it). Every failure is a :class:`~bbzo.errors.ConfigError` that says which part
is wrong (no module, no file, no attribute, a builder that raised) and how to fix it.

* :func:`load_object` -- the object a reference names;
* :func:`build_model` -- a registered model name or a reference to an ``nn.Module`` / a builder;
* :func:`load_data` -- ``(inputs, targets)`` from an ``.npz`` / ``.pt`` / ``.npy`` file or a reference;
* :func:`build_python_oracle` -- an :class:`~bbzo.oracle.Oracle` (instance or class) or a batched
  function by reference, wrapped in a :class:`~bbzo.oracle.FunctionOracle`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from .checkpoint import load_weights
from .errors import BbzoError, ConfigError, ShapeError
from .oracle import FunctionOracle, Oracle, where_raised

__all__ = ["load_object", "is_reference", "split_reference", "build_model", "load_data", "build_python_oracle",
           "call_user", "check_kwargs"]


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
    folder = str(path.parent)
    if folder not in sys.path:  # a file's neighbours are importable (`import mysim_helpers` next to it);
        sys.path.append(folder)  # appended, so a neighbour never shadows an installed package
    try:
        spec.loader.exec_module(mod)
    except Exception as e:
        del sys.modules[name]
        raise ConfigError(f"reference {ref!r}: importing {path.name} raised {type(e).__name__}{where_raised(e)}: {e}") from e
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
        raise ConfigError(f"reference {ref!r}: importing {module!r} raised {type(e).__name__}{where_raised(e)}: {e}") from e


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


# ---------------------------------------------------------------------------- builders
def check_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any], what: str) -> None:
    """Refuse keyword arguments ``fn`` does not take, showing its signature."""
    try:
        inspect.signature(fn).bind_partial(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{what}: {e}. Signature: {getattr(fn, '__name__', what)}{inspect.signature(fn)}") from None
    except ValueError:  # no signature (builtins)
        pass


def call_user(fn: Any, kwargs: dict[str, Any], what: str, when: str = "") -> Any:
    """Call a user's builder; its own exceptions become one clear :class:`ConfigError` (bbzo's pass through)."""
    try:
        return fn(**kwargs)
    except BbzoError:
        raise
    except Exception as e:
        raise ConfigError(f"{what} raised {type(e).__name__}{where_raised(e)}{when}: {e}") from e


def build_model(spec: str, kwargs: Optional[dict[str, Any]] = None) -> nn.Module:
    """A registered model name (``bbzo models``) or a reference to an ``nn.Module`` / a callable returning one."""
    kwargs = kwargs or {}
    if not is_reference(spec):
        from .models import create_model, list_models
        if spec not in list_models():
            raise ConfigError(f"--model {spec!r} is neither a registered model ({', '.join(list_models())}) nor a "
                              "reference 'module:callable' / 'file.py:callable' returning an nn.Module.")
        return create_model(spec, **kwargs)
    obj = load_object(spec)
    if isinstance(obj, nn.Module):
        if kwargs:
            raise ConfigError(f"--model {spec!r} is a module instance; --model-kwargs need a callable.")
        return obj
    if not callable(obj):
        raise ConfigError(f"--model {spec!r} is a {type(obj).__name__}; it must be an nn.Module or a callable returning one.")
    check_kwargs(obj, kwargs, f"model {spec!r}")
    model = call_user(obj, kwargs, f"model {spec!r}")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {spec!r} returned {type(model).__name__}; it must return an nn.Module.")
    return model


def _to_tensor(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(np.asarray(x))
    except Exception as e:
        raise ConfigError(f"data: {what} cannot be turned into a tensor ({type(x).__name__}: {e}).") from e


def _split_pair(obj: Any, source: str) -> tuple[Any, Any]:
    if isinstance(obj, dict) or hasattr(obj, "files"):  # dict, np.load's NpzFile
        keys = list(obj.keys()) if isinstance(obj, dict) else list(obj.files)
        if "inputs" not in keys:
            raise ConfigError(f"data {source}: needs an 'inputs' array (and 'targets' unless --loss oracle); it "
                              f"holds {', '.join(map(str, keys)) or 'nothing'}.")
        return obj["inputs"], (obj["targets"] if "targets" in keys else None)
    if isinstance(obj, (tuple, list)) and len(obj) in (1, 2):
        return obj[0], (obj[1] if len(obj) == 2 else None)
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return obj, None
    raise ConfigError(f"data {source}: expected (inputs, targets), a dict with 'inputs'/'targets', or an array; "
                      f"got {type(obj).__name__}.")


def load_data(spec: str, kwargs: Optional[dict[str, Any]] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(inputs, targets)`` from an ``.npz`` / ``.pt`` / ``.npy`` file or a ``module:callable`` reference."""
    kwargs = kwargs or {}
    path = Path(spec)
    if path.is_file():
        if kwargs:
            raise ConfigError("--data-kwargs only applies when --data names a callable (module:function).")
        suffix = path.suffix.lower()
        try:
            if suffix == ".npz":
                with np.load(path, allow_pickle=False) as z:
                    x, y = _split_pair(z, str(path))
                    x, y = np.array(x), (np.array(y) if y is not None else None)
            elif suffix == ".npy":
                x, y = np.load(path, allow_pickle=False), None
            elif suffix in (".pt", ".pth"):
                x, y = _split_pair(load_weights(path, what="data"), str(path))
            else:
                raise ConfigError(f"data file {str(path)!r}: unknown type {suffix!r}; use .npz (arrays 'inputs' and "
                                  "'targets'), .pt (a dict of tensors) or a module:callable reference.")
        except BbzoError:
            raise
        except Exception as e:  # numpy's own hints (allow_pickle=True) would be the wrong advice
            what = {".npz": "an .npz archive (numpy.savez)", ".npy": "an .npy array (numpy.save)"}.get(suffix, "readable")
            raise ConfigError(f"data file {str(path)!r} is not {what} ({type(e).__name__}). Write it with "
                              "numpy.savez(path, inputs=..., targets=...), or pass a module:function that returns "
                              "(inputs, targets).") from None
        source = str(path)
    elif is_reference(spec) and not spec.endswith((".npz", ".pt", ".pth", ".npy")):
        fn = load_object(spec)
        if not callable(fn):
            x, y = _split_pair(fn, spec)
        else:
            check_kwargs(fn, kwargs, f"data {spec!r}")
            x, y = _split_pair(call_user(fn, kwargs, f"data {spec!r}"), spec)
        source = spec
    else:
        raise ConfigError(f"data file {spec!r} not found. --data takes an .npz file with arrays 'inputs' and "
                          "'targets', a .pt file, or a reference 'module:function' / 'file.py:function' that "
                          "returns (inputs, targets).")
    x = _to_tensor(x, "inputs")
    y = _to_tensor(y, "targets") if y is not None else None
    for name, t in (("inputs", x), ("targets", y)):
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = (~torch.isfinite(t.reshape(t.shape[0], -1))).any(1).nonzero().flatten()
            raise ConfigError(f"data {source}: the {name} hold NaN/inf in {bad.numel()} rows (first: row {int(bad[0])}). "
                              f"Drop or repair those rows before training (a black box would only fail on them later).")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ShapeError(f"data {source}: inputs must have a batch dimension with at least one row, got shape {tuple(x.shape)}.")
    if y is not None and (y.dim() == 0 or y.shape[0] != x.shape[0]):
        raise ShapeError(f"data {source}: {x.shape[0]} input rows but targets of shape {tuple(y.shape)}.")
    return x, y


def build_python_oracle(ref: str, kwargs: Optional[dict[str, Any]] = None, array: str = "numpy") -> Oracle:
    """The black box a reference names: an :class:`Oracle` instance or class, or a batched function.

    ``array``: what a plain function receives, ``numpy`` arrays (float64 on CPU) or ``torch`` tensors.
    Exceptions of the user's code at query time become one :class:`~bbzo.errors.OracleError` line
    (the :class:`Oracle` base does that), those at build time one :class:`ConfigError`.
    """
    kwargs = dict(kwargs or {})
    if array not in ("numpy", "torch"):
        raise ConfigError(f"--oracle-array must be numpy or torch, got {array!r}.")
    numpy = array == "numpy"
    obj = load_object(ref)
    if isinstance(obj, Oracle):
        if kwargs:
            raise ConfigError(f"--oracle {ref!r} is an Oracle instance; --oracle-kwargs need a class or function.")
        return obj
    if inspect.isclass(obj):
        check_kwargs(obj, kwargs, f"oracle {ref!r}")
        inst = call_user(obj, kwargs, f"oracle {ref!r}", " when built")
        if isinstance(inst, Oracle):
            return inst
        if not callable(inst):
            raise ConfigError(f"oracle {ref!r}: an instance of {obj.__name__} is neither an Oracle nor callable.")
        return FunctionOracle(inst, numpy=numpy, name=ref)
    if callable(obj):
        check_kwargs(obj, kwargs, f"oracle {ref!r}")
        fn = functools.partial(obj, **kwargs) if kwargs else obj
        return FunctionOracle(fn, numpy=numpy, name=ref)
    raise ConfigError(f"--oracle {ref!r} is a {type(obj).__name__}; it must be an Oracle (instance or "
                      "subclass) or a batched function inputs -> outputs.")
