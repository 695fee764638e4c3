"""The score registry: ``compute_score(name, model, objective, inputs, targets, **options)``.

Every score is a function ``fn(model, objective, inputs, targets, *, names, seed, ctx, **options)`` whose
options are keyword-only parameters with defaults; :func:`compute_score` binds the caller's options
against that signature, so a misspelled option is an error that lists the real ones. The queries a score
made are *counted* by the :class:`~bbzo.ledger.QueryLedger` it is given (never declared by the score),
and every score works on a private copy: the model is never changed.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ...adapters import FunctionalAdapter
from ...errors import ConfigError
from ...ledger import QueryLedger

__all__ = ["ScoreResult", "ScoreInfo", "ScoreContext", "register_score", "list_scores", "compute_score",
           "prunable_params", "score_options", "score_accepts", "scoring_copy", "named_params", "cast_inputs"]


@dataclass
class ScoreResult:
    """Scores of one model at initialization.

    Attributes:
        scores: ``{param name: score tensor}`` shaped like the parameter (float64, CPU).
        keep: How to rank them (``largest_abs`` | ``largest`` | ``smallest``).
        queries: Loss queries (parameter-set evaluations on the scoring batch), as counted by the ledger.
        seconds: Wall time.
        info: The options used.
    """

    scores: dict[str, torch.Tensor]
    keep: str
    queries: int = 0
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ScoreInfo:
    name: str
    description: str
    query_only: bool  # uses loss values only (no autograd through the objective)
    needs_data: bool
    cost: str


@dataclass
class ScoreContext:
    """What a score gets besides its options: the ledger to charge and how to evaluate queries.

    ``adapter(model)`` builds the adapter that evaluates perturbed copies (default: the generic
    ``torch.func`` one; a :class:`~bbzo.adapters.LoopAdapter` for a model inside a rollout).
    """

    ledger: QueryLedger
    adapter_factory: Optional[Callable[[nn.Module], Any]] = None

    def adapter(self, model: nn.Module) -> Any:
        return (self.adapter_factory or FunctionalAdapter)(model)


_SCORES: dict[str, tuple[Callable[..., ScoreResult], ScoreInfo]] = {}
_FIXED = ("model", "objective", "inputs", "targets", "names", "seed", "ctx")


def register_score(info: ScoreInfo) -> Callable[[Callable[..., ScoreResult]], Callable[..., ScoreResult]]:
    def deco(fn: Callable[..., ScoreResult]) -> Callable[..., ScoreResult]:
        if info.name in _SCORES:
            raise ConfigError(f"a score named {info.name!r} is already registered.")
        _SCORES[info.name] = (fn, info)
        return fn
    return deco


def list_scores(with_info: bool = False) -> list[Any]:
    names = sorted(_SCORES)
    return [_SCORES[n][1] for n in names] if with_info else names


def _get(name: str) -> tuple[Callable[..., ScoreResult], ScoreInfo]:
    if name not in _SCORES:
        raise ConfigError(f"unknown score {name!r}; registered: {', '.join(sorted(_SCORES))}.")
    return _SCORES[name]


def score_options(name: str) -> dict[str, Any]:
    """The options of score ``name`` and their defaults."""
    fn, _ = _get(name)
    return {p.name: p.default for p in inspect.signature(fn).parameters.values() if p.name not in _FIXED}


def score_accepts(name: str, option: str) -> bool:
    return option in score_options(name)


def prunable_params(model: nn.Module, include: Optional[Sequence[str]] = None) -> list[str]:
    """Names of the scored tensors: Conv/Linear weights by default (DeepZero), or glob ``include`` patterns."""
    if include:
        names = [n for n, p in model.named_parameters() if any(fnmatch.fnmatch(n, pat) for pat in include)]
    else:
        names = []
        for mname, m in model.named_modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and m.weight.requires_grad:
                names.append(f"{mname}.weight" if mname else "weight")
    if not names:
        raise ConfigError("no parameters to score: the model has no Conv/Linear weights; pass include=[glob, ...].")
    return names


def compute_score(name: str, model: nn.Module, objective: Any = None, inputs: Any = None, targets: Any = None, *,
                  include: Optional[Sequence[str]] = None, seed: int = 0, ledger: Optional[QueryLedger] = None,
                  adapter_factory: Optional[Callable[[nn.Module], Any]] = None, **options: Any) -> ScoreResult:
    """Score ``model``'s prunable tensors with the registered score ``name``.

    Args:
        objective: Per-sample losses (the oracle): ``fn(outputs, targets)``, ``fn(outputs, inputs, targets)``
            or an :class:`~bbzo.objective.Objective` (a rollout with a loop adapter); scores that need
            data use the mean over the batch ``inputs`` ``(B, ...)``.
        include: Glob patterns of tensors to score (default: Conv/Linear weights).
        seed: Seeds every random draw of the score.
        ledger: Where the score's queries are charged (a private ledger if None); ``result.queries`` is
            what it counted.
        adapter_factory: ``model -> Adapter`` evaluating the queries (e.g. a ``LoopAdapter``).
        **options: Options of the score (see ``score_options(name)``), e.g. ``q=192``, ``mu=5e-3``.
    """
    fn, info = _get(name)
    accepted = score_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        shown = ", ".join(f"{k}={v!r}" for k, v in accepted.items()) or "none"
        raise ConfigError(f"score {name!r} takes no option {', '.join(map(repr, unknown))}; its options: {shown}.")
    if info.needs_data and (objective is None or inputs is None):
        raise ConfigError(f"score {name!r} needs data: pass an objective, inputs and targets (CLI: --data).")
    names = prunable_params(model, include)
    ledger = ledger if ledger is not None else QueryLedger()
    before = ledger.queries
    t0 = time.perf_counter()
    res = fn(model, objective, inputs, targets, names=names, seed=seed,
             ctx=ScoreContext(ledger, adapter_factory), **options)
    res.seconds = time.perf_counter() - t0
    res.queries = ledger.queries - before
    return res


# ---------------------------------------------------------------------------- helpers for the scores
def scoring_copy(model: nn.Module, names: Sequence[str], dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A private copy whose only trainable tensors are the scored ones (same train/eval mode)."""
    m = copy.deepcopy(model)
    if dtype is not None:
        m = m.to(dtype)
    keep = set(names)
    for n, p in m.named_parameters():
        p.requires_grad_(n in keep)
    return m


def named_params(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{name: parameter}`` in the order of ``names``."""
    named = dict(model.named_parameters())
    return {n: named[n] for n in names}


def cast_inputs(inputs: Any, dtype: torch.dtype) -> Any:
    if isinstance(inputs, torch.Tensor) and inputs.is_floating_point():
        return inputs.to(dtype)
    return inputs
