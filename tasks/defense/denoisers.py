"""The denoiser ``D``: any module, and how to rebuild it recorded in the files bbzo writes.

What a user can name as a denoiser (``--denoiser``, the values of ``--denoisers``, ``--denoiser-arch``):

* ``dncnn`` -- Salman et al.'s DnCNN, shaped by ``--depth`` / ``--width`` (the default);
* ``module:attr`` or ``file.py:attr`` -- an ``nn.Module`` instance, an ``nn.Module`` class, or a function that
  returns one (called with ``--denoiser-kwargs``); a user's architecture, or a pretrained model whose code
  loads its own weights (a diffusion denoiser wrapped as ``x + delta -> x_hat`` in [0, 1]);
* a TorchScript (``torch.jit.save``) or ``torch.export`` (``.pt2``) file: used as it is. bbzo cannot perturb
  the weights of a compiled file, so it is certified as it is, or fine-tuned through a small trainable
  adapter after it (``--adapter-width``, :class:`AdaptedDenoiser`);
* a weights file: a ``model.pt`` that ``bbzo defense pretrain`` / ``finetune`` wrote, a state dict, or
  Salman et al.'s ``{"state_dict": ...}`` checkpoint.

**The architecture travels with the weights.** Every denoiser bbzo trains carries its *spec* -- a small
dict ``{"format": "bbzo-denoiser/1", "arch": "dncnn", "kwargs": {"depth": 17, "width": 64}}`` -- as the
module's extra state (``nn.Module.get_extra_state``), so ``model.state_dict()``, and with it ``model.pt`` and
every checkpoint, holds it under the key ``_extra_state``. Loading such a file rebuilds the right
architecture whatever the flags say; ``--depth`` / ``--width`` / ``--denoiser-arch`` only matter for files
that do not record one (Salman's checkpoints, bbzo's before this format). A file reference is recorded with
its absolute path, an adapter with its frozen denoiser's path and sha256 (a changed file is refused).
Everything in a spec is plain data, so ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from bbzo.errors import ConfigError
from bbzo.models.dncnn import DnCNN
from bbzo.oracles.classifier import error_text, is_reference, load_model_file

__all__ = ["FORMAT", "AdaptedDenoiser", "build_denoiser", "dncnn_spec", "load_denoiser_source", "record",
           "spec_of", "describe", "reference_spec", "sha256", "frozen", "can_finetune"]

FORMAT = "bbzo-denoiser/1"
KEY = "_extra_state"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def dncnn_spec(depth: int, width: int) -> dict[str, Any]:
    return {"format": FORMAT, "arch": "dncnn", "kwargs": {"depth": int(depth), "width": int(width)}}


def _absolute_reference(ref: str) -> str:
    """``file.py:attr`` with the file's absolute path (a later command may run elsewhere); modules unchanged."""
    from bbzo.references import split_reference
    module, attr = split_reference(ref)
    if module.endswith(".py") or "/" in module:
        return f"{Path(module).expanduser().resolve()}:{attr}"
    return ref


def reference_spec(ref: str, kwargs: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    return {"format": FORMAT, "arch": _absolute_reference(ref), "kwargs": dict(kwargs or {})}


def describe(spec: Optional[dict[str, Any]]) -> str:
    """One line: ``DnCNN(depth=6, width=32)``, ``mypkg.den:Net(...)``, ``adapter 2x16 after FILE``."""
    if not spec:
        return "unrecorded"
    arch, kw = spec.get("arch"), spec.get("kwargs", {})
    args = ", ".join(f"{k}={v}" for k, v in kw.items())
    if arch == "dncnn":
        return f"DnCNN({args})"
    if arch == "adapter":
        return f"adapter DnCNN({args}) after {spec['base'].get('source')}"
    if arch == "file":
        return f"compiled file {spec.get('path')}"
    return f"{arch}({args})"


# ------------------------------------------------------------------------------------- the record
class _Recorded:
    """Mixin: the module's spec is its extra state (``state_dict()[KEY]``)."""

    def get_extra_state(self) -> dict[str, Any]:
        return dict(self.__dict__.get("_bbzo_spec") or {})

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict) and state.get("format") == FORMAT:
            self.__dict__["_bbzo_spec"] = dict(state)


_RECORDED: dict[type, type] = {}


def record(module: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Attach ``spec`` to ``module`` (in place) so that its state dict carries it; returns the module.

    The module's class is swapped for a subclass that adds ``get_extra_state`` / ``set_extra_state``
    (parameter names, stages and behaviour are unchanged). A class with its own extra state is left alone.
    """
    cls = type(module)
    if not issubclass(cls, _Recorded):
        if getattr(cls, "get_extra_state", nn.Module.get_extra_state) is not nn.Module.get_extra_state:
            return module  # the module keeps its own extra state; its spec is not recorded
        if cls not in _RECORDED:
            _RECORDED[cls] = type(cls.__name__, (_Recorded, cls), {"__module__": cls.__module__,
                                                                   "__qualname__": cls.__qualname__})
        module.__class__ = _RECORDED[cls]
    module.__dict__["_bbzo_spec"] = dict(spec)
    return module


def spec_of(module: Any) -> Optional[dict[str, Any]]:
    """The spec recorded on a module (None: none)."""
    spec = getattr(module, "__dict__", {}).get("_bbzo_spec")
    return dict(spec) if spec else None


# ------------------------------------------------------------------------------------- frozen + adapter
def frozen(module: Any) -> Any:
    """``module`` in eval mode with every parameter frozen (a module) or as it is (a function)."""
    if isinstance(module, nn.Module):
        if not isinstance(module, torch.fx.GraphModule):  # an exported program is traced in eval mode
            module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
    return module


class _FrozenStage(nn.Module):
    """A stage that runs the frozen denoiser (held outside the module tree: never trained, never saved)."""

    def __init__(self, base: Any) -> None:
        super().__init__()
        self.__dict__["base"] = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.__dict__["base"](x)


class AdaptedDenoiser(DnCNN):
    """A frozen denoiser ``D`` followed by a small trainable DnCNN ``A``: ``A(D(x)) = D(x) - net(D(x))``.

    ``A``'s last convolution starts at zero, so the pair starts as ``D`` itself, and ZO fine-tuning of that
    layer is DeepZero's last-layer recipe on top of any denoiser -- a compiled file or a model too large to
    perturb. ``D`` runs once per step as the first stage (the staged adapter reuses its output for every
    query; only ``A``'s last conv changes, by plane adds). ``D`` is not a submodule: ``state_dict()`` holds
    ``A``'s weights and the spec, which names ``D``'s source and its sha256.

    Args:
        base: The frozen denoiser (any callable on ``(N, C, H, W)``).
        base_spec: How to load it again: ``{"source": path or reference, "sha256": ..., "spec": its own spec}``.
        depth, width: ``A``'s shape (2 x 16: conv 3->16 + ReLU + conv 16->3, 432 weights in the last conv).
    """

    def __init__(self, base: Any, base_spec: dict[str, Any], depth: int = 2, width: int = 16, channels: int = 3) -> None:
        super().__init__(depth, width, channels)
        self.__dict__["base"] = frozen(base)
        self.__dict__["_bbzo_spec"] = {"format": FORMAT, "arch": "adapter",
                                       "kwargs": {"depth": int(depth), "width": int(width)}, "base": dict(base_spec)}

    def get_extra_state(self) -> dict[str, Any]:
        return dict(self.__dict__["_bbzo_spec"])

    def set_extra_state(self, state: Any) -> None:
        pass  # the spec is the one this adapter was built from (checked by the loader)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_FrozenStage(self.__dict__["base"])(x))

    def bbzo_stages(self) -> list[nn.Module]:
        return [_FrozenStage(self.__dict__["base"]), *super().bbzo_stages()]

    def _apply(self, fn: Any, recurse: bool = True) -> "AdaptedDenoiser":  # .to(device) moves D too
        base = self.__dict__["base"]
        if isinstance(base, nn.Module):
            base._apply(fn)
        return super()._apply(fn, recurse)


# ------------------------------------------------------------------------------------- building and loading
def _from_reference(ref: str, kwargs: dict[str, Any]) -> nn.Module:
    from bbzo.references import call_user, check_kwargs, load_object

    obj = load_object(ref)
    if isinstance(obj, nn.Module):
        if kwargs:
            raise ConfigError(f"denoiser {ref} is a module instance; --denoiser-kwargs need a class or a function.")
        return obj
    if not callable(obj):
        raise ConfigError(f"denoiser {ref} is a {type(obj).__name__}; name an nn.Module, its class, or a function "
                          "returning one.")
    check_kwargs(obj, kwargs, f"denoiser {ref}")
    out = call_user(obj, kwargs, f"denoiser {ref}")
    if not isinstance(out, nn.Module):
        raise ConfigError(f"denoiser {ref} returned a {type(out).__name__}; it must build an nn.Module "
                          "(images (N, 3, H, W) in [0, 1] -> denoised images).")
    return out


def build_denoiser(spec: dict[str, Any]) -> nn.Module:
    """A module from a spec (untrained for ``dncnn`` and classes; an adapter loads its frozen denoiser)."""
    arch, kwargs = spec.get("arch"), dict(spec.get("kwargs") or {})
    if arch == "dncnn":
        try:
            model: nn.Module = DnCNN(**kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"cannot build DnCNN({kwargs}): {e}.") from e
    elif arch == "adapter":
        base_spec = spec.get("base") or {}
        source = base_spec.get("source")
        path = Path(str(source))
        if path.is_file() and base_spec.get("sha256") and sha256(path) != base_spec["sha256"]:
            raise ConfigError(f"the frozen denoiser {path} changed since this adapter was trained (sha256 differs); "
                              "restore that file or train the adapter again.")
        base = load_denoiser_source(str(source), base_spec.get("spec"))
        return AdaptedDenoiser(base, base_spec, **kwargs)
    elif arch == "file":
        return load_model_file(Path(spec["path"]), "denoiser")
    elif isinstance(arch, str) and is_reference(arch):
        model = _from_reference(arch, kwargs)
    else:
        raise ConfigError(f"unknown denoiser architecture {arch!r}: use dncnn, module:attr, file.py:attr, or a "
                          "TorchScript / torch.export file.")
    return record(model, spec)


def _is_torchscript(path: Path) -> bool:
    if path.suffix == ".pt2":
        return True
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_denoiser_source(source: str, fallback: Optional[dict[str, Any]], device: Any = "cpu") -> Any:
    """The denoiser a user named (see the module docstring), on ``device``, trainable (:func:`frozen` freezes it).

    Args:
        source: A weights file, a TorchScript / ``.pt2`` file, or a reference.
        fallback: The spec for a weights file that records none (from the flags), or None.
    Raises:
        ConfigError: a missing, corrupt or foreign file, or weights that do not fit the architecture,
            naming the file, the architecture and what to change.
    """
    text = str(source)
    path = Path(text)
    if not path.is_file() and is_reference(text):
        return build_denoiser(reference_spec(text)).to(device)
    if not path.is_file():
        raise ConfigError(f"denoiser {path} does not exist; train one with `bbzo defense pretrain`, or name a "
                          "TorchScript / torch.export file or a module:attr.")
    if _is_torchscript(path):
        return record_file(load_model_file(path, "denoiser"), path).to(device)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt, truncated, or not a tensor file
        raise ConfigError(f"denoiser {path} cannot be read ({type(e).__name__}: {error_text(e)}); it must be a "
                          "model.pt written by bbzo, a state dict, or a TorchScript / torch.export file.") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # Salman et al.'s checkpoints
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"denoiser {path} holds a {type(state).__name__}, not a state dict.")
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}  # DataParallel prefix
    recorded = state.get(KEY) if isinstance(state.get(KEY), dict) and state[KEY].get("format") == FORMAT else None
    spec = recorded or fallback
    if spec is None:
        raise ConfigError(f"denoiser {path} does not record its architecture; name it with --denoiser-arch "
                          "(dncnn with --depth/--width, or module:attr).")
    model = build_denoiser(spec)
    if recorded is None:
        state.pop(KEY, None)
    try:
        model.load_state_dict(state, strict=True)
    except Exception as e:  # noqa: BLE001 - another architecture or shape
        flags = "; check --denoiser-arch/--depth/--width" if recorded is None else ""
        raise ConfigError(f"{path} is not a {describe(spec)} state dict ({type(e).__name__}: "
                          f"{str(e).splitlines()[0]}){flags}, or retrain it.") from e
    if recorded is None and isinstance(model, nn.Module):
        record(model, spec)
    return model.to(device)


def record_file(model: Any, path: Path) -> Any:
    """Record a compiled file's spec on the module it loaded to (certify reports it)."""
    if isinstance(model, nn.Module):
        model.__dict__["_bbzo_spec"] = {"format": FORMAT, "arch": "file", "path": str(path.resolve())}
    return model


def can_finetune(model: Any) -> Optional[str]:
    """Why bbzo cannot fine-tune ``model`` in place (None: it can)."""
    if not isinstance(model, nn.Module) or isinstance(model, torch.jit.ScriptModule):
        return "a TorchScript file or a function"
    if not any(True for _ in model.parameters()):
        return "a module without parameters"
    return None
