"""The bbzo error hierarchy.

Every error bbzo raises on purpose derives from :class:`BbzoError`, so a caller can catch one
type. Messages say what went wrong *and* how to fix it.
"""

from __future__ import annotations

__all__ = [
    "BbzoError",
    "OracleError",
    "BudgetExceeded",
    "ConfigError",
    "ShapeError",
    "NonFiniteError",
    "CheckpointError",
    "InefficientSettingsWarning",
    "WorkerError",
]


class BbzoError(Exception):
    """Base class of every error bbzo raises on purpose."""


class OracleError(BbzoError):
    """A black-box oracle was misused or returned something unusable (wrong shape, NaN/inf, ...)."""


class BudgetExceeded(BbzoError):
    """A query would exceed the oracle's budget. Raised *before* the call, so nothing is lost."""


class ConfigError(BbzoError, ValueError):
    """An option or combination of options is invalid."""


class ShapeError(BbzoError, ValueError):
    """A tensor has the wrong shape for what it is passed to."""


class NonFiniteError(BbzoError, FloatingPointError):
    """A loss or estimate is NaN/inf; continuing would silently corrupt the parameters."""


class CheckpointError(BbzoError):
    """A checkpoint is missing, truncated, corrupt or does not match the run."""


class InefficientSettingsWarning(UserWarning):
    """Settings that work but waste queries or time (e.g. CGE without feature reuse on a staged model)."""


class WorkerError(BbzoError):
    """A worker of a distributed run failed, died or stopped answering; every rank stops with this error."""
