"""bbzo: train neural networks through black boxes with zeroth-order gradient estimates (DeepZero).

What a user's own loop needs, in one import::

    import bbzo
    est = bbzo.create_estimator("cge", mu=1e-3)
    grads, state = bbzo.estimate_grad(model, objective, x, y, est, state)   # also sets p.grad

Everything else lives in its module: :mod:`bbzo.step` (one gradient step), :mod:`bbzo.adapters` (batched
evaluation, feature reuse), :mod:`bbzo.parallel` (executors), :mod:`bbzo.sparsity` (DeepZero's sparse CGE).

The names below are imported when first used (PEP 562), so ``import bbzo.errors`` or ``bbzo --help`` does
not pay for torch; ``from bbzo import Trainer`` and ``bbzo.Trainer`` work as usual.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version as _version
from typing import TYPE_CHECKING, Any

try:
    __version__ = _version("bbzo")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

_EXPORTS = {  # public name -> the module that defines it
    "estimate_grad": ".api", "TensorBatches": ".data", "FailurePolicy": ".failures", "QueryLedger": ".ledger",
    "Objective": ".objective", "OracleObjective": ".objective", "Rollout": ".objective",
    "FunctionOracle": ".oracle", "ModuleOracle": ".oracle", "Oracle": ".oracle", "Trainer": ".trainer",
    **{n: ".estimators" for n in ("chain", "clip_by_global_norm", "create_estimator", "list_estimators", "masked",
                                  "register_estimator")},
    **{n: ".errors" for n in ("BbzoError", "BudgetExceeded", "CheckpointError", "ConfigError",
                              "InefficientSettingsWarning", "NonFiniteError", "OracleError", "ShapeError",
                              "WorkerError")},
}

__all__ = [
    "__version__", "estimate_grad", "Trainer", "TensorBatches",
    "create_estimator", "list_estimators", "register_estimator", "masked", "chain", "clip_by_global_norm",
    "Oracle", "FunctionOracle", "ModuleOracle", "Objective", "OracleObjective", "Rollout", "QueryLedger",
    "FailurePolicy",
    "BbzoError", "OracleError", "BudgetExceeded", "ConfigError", "ShapeError", "NonFiniteError",
    "CheckpointError", "WorkerError", "InefficientSettingsWarning",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bbzo' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .api import estimate_grad
    from .data import TensorBatches
    from .errors import (BbzoError, BudgetExceeded, CheckpointError, ConfigError, InefficientSettingsWarning,
                         NonFiniteError, OracleError, ShapeError, WorkerError)
    from .estimators import chain, clip_by_global_norm, create_estimator, list_estimators, masked, register_estimator
    from .failures import FailurePolicy
    from .ledger import QueryLedger
    from .objective import Objective, OracleObjective, Rollout
    from .oracle import FunctionOracle, ModuleOracle, Oracle
    from .trainer import Trainer
