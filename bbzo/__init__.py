"""bbzo: train neural networks through black boxes with zeroth-order gradient estimates (DeepZero)."""

from importlib.metadata import PackageNotFoundError, version as _version

from .adapters import FunctionalAdapter, LoopAdapter, StagedAdapter, make_adapter
from .api import EstimateResult, estimate, estimate_grad, evaluate_sharded
from .errors import (
    BbzoError, BudgetExceeded, CheckpointError, ConfigError, InefficientSettingsWarning,
    NonFiniteError, OracleError, ShapeError,
)
from .estimators import clip_by_global_norm, create_estimator, list_estimators, masked, register_estimator
from .ledger import QueryLedger
from .objective import Objective, OracleObjective, as_objective
from .oracle import FunctionOracle, ModuleOracle, Oracle

try:
    __version__ = _version("bbzo")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "__version__", "estimate_grad", "estimate", "evaluate_sharded", "EstimateResult",
    "create_estimator", "list_estimators", "register_estimator", "masked", "clip_by_global_norm",
    "make_adapter", "FunctionalAdapter", "StagedAdapter", "LoopAdapter",
    "Oracle", "FunctionOracle", "ModuleOracle", "QueryLedger", "Objective", "OracleObjective", "as_objective",
    "BbzoError", "OracleError", "BudgetExceeded", "ConfigError", "ShapeError", "NonFiniteError",
    "CheckpointError", "InefficientSettingsWarning",
]
