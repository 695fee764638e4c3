"""Zeroth-order gradient estimators (registered by name)."""

from .base import Estimator, EstimatorInfo
from .cge import CGE, SparseCGE, normalize_coords
from .registry import create_estimator, get_estimator_class, list_estimators, register_estimator
from .rge import RGE

__all__ = [
    "Estimator", "EstimatorInfo", "CGE", "SparseCGE", "RGE", "normalize_coords",
    "create_estimator", "get_estimator_class", "list_estimators", "register_estimator",
]
