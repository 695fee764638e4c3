"""Estimator registry: ``register_estimator``, ``list_estimators``, ``create_estimator``."""

from __future__ import annotations

import fnmatch
import inspect
from typing import Any, Optional, Union

from ..errors import ConfigError
from .base import Estimator, EstimatorInfo

__all__ = ["register_estimator", "list_estimators", "create_estimator", "get_estimator_class"]

_REGISTRY: dict[str, type[Estimator]] = {}


def register_estimator(cls: type[Estimator]) -> type[Estimator]:
    """Class decorator; raises on a duplicate name (nevergrad's ``Registry``)."""
    name = cls.info.name
    if name in _REGISTRY:
        raise ConfigError(f"an estimator named {name!r} is already registered ({_REGISTRY[name].__qualname__}).")
    _REGISTRY[name] = cls
    return cls


def list_estimators(pattern: str = "*", with_info: bool = False,
                    zeroth_order: Optional[bool] = None) -> Union[list[str], list[EstimatorInfo]]:
    """Registered estimator names (or their :class:`EstimatorInfo`) matching a glob pattern.

    ``zeroth_order=True`` keeps only those that query (usable through a black box), ``False`` only the
    white-box references.
    """
    names = sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern)
                   and (zeroth_order is None or _REGISTRY[n].info.zeroth_order == zeroth_order))
    return [_REGISTRY[n].info for n in names] if with_info else names


def get_estimator_class(name: str) -> type[Estimator]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown estimator {name!r}; registered: {', '.join(sorted(_REGISTRY))}."
        ) from None


def create_estimator(name: str, **kwargs: Any) -> Estimator:
    """Build a registered estimator by name, e.g. ``create_estimator("cge", mu=5e-3)``."""
    cls = get_estimator_class(name)
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        raise ConfigError(f"estimator {name!r}: {e}. Signature: {name}{inspect.signature(cls)}") from None
    return cls(**kwargs)
