"""bbzo: train neural networks through black boxes with zeroth-order gradient estimates (DeepZero).

What a user's own loop needs, in one import::

    import bbzo
    est = bbzo.create_estimator("cge", mu=1e-3)
    grads, state = bbzo.estimate_grad(model, objective, x, y, est, state)   # also sets p.grad

Everything else lives in its module: :mod:`bbzo.step` (one gradient step), :mod:`bbzo.adapters` (batched
evaluation, feature reuse), :mod:`bbzo.parallel` (executors), :mod:`bbzo.sparsity` (DeepZero's sparse CGE).
"""

from importlib.metadata import PackageNotFoundError, version as _version

from .api import estimate_grad
from .data import TensorBatches
from .errors import (
    BbzoError, BudgetExceeded, CheckpointError, ConfigError, InefficientSettingsWarning,
    NonFiniteError, OracleError, ShapeError, WorkerError,
)
from .estimators import chain, clip_by_global_norm, create_estimator, list_estimators, masked, register_estimator
from .failures import FailurePolicy
from .ledger import QueryLedger
from .objective import Objective, OracleObjective, Rollout
from .oracle import FunctionOracle, ModuleOracle, Oracle
from .trainer import Trainer

try:
    __version__ = _version("bbzo")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "__version__", "estimate_grad", "Trainer", "TensorBatches",
    "create_estimator", "list_estimators", "register_estimator", "masked", "chain", "clip_by_global_norm",
    "Oracle", "FunctionOracle", "ModuleOracle", "Objective", "OracleObjective", "Rollout", "QueryLedger",
    "FailurePolicy",
    "BbzoError", "OracleError", "BudgetExceeded", "ConfigError", "ShapeError", "NonFiniteError",
    "CheckpointError", "WorkerError", "InefficientSettingsWarning",
]
