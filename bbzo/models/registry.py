"""Model registry (timm-style): ``create_model("resnet20")``, ``list_models("resnet*")``."""

from __future__ import annotations

import fnmatch
import inspect
from typing import Any, Callable

from torch import nn

from ..errors import ConfigError

__all__ = ["register_model", "create_model", "list_models", "model_builder"]

_MODELS: dict[str, tuple[Callable[..., nn.Module], str]] = {}


def register_model(name: str, description: str = "") -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ConfigError(f"a model named {name!r} is already registered.")
        _MODELS[name] = (fn, description)
        return fn
    return deco


def list_models(pattern: str = "*", with_description: bool = False) -> list[Any]:
    names = sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))
    return [(n, _MODELS[n][1]) for n in names] if with_description else names


def model_builder(name: str) -> Callable[..., nn.Module]:
    """The registered builder of ``name`` (to read its signature)."""
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; registered: {', '.join(sorted(_MODELS))}.")
    return _MODELS[name][0]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; registered: {', '.join(sorted(_MODELS))}.")
    fn = _MODELS[name][0]
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as e:
        raise ConfigError(f"model {name!r}: {e}. Signature: {name}{inspect.signature(fn)}") from None
    return fn(**kwargs)
