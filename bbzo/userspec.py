"""Deprecated name of :mod:`bbzo.references` (how a user names a model, an oracle or data by reference)."""

from .references import *  # noqa: F401,F403
from .references import __all__  # noqa: F401
