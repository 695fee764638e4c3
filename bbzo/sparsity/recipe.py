"""DeepZero's recipe, written once: a pruning score -> layer-wise ratios -> dynamic Sparse-CGE.

DeepZero (§4, Alg. 1-2) never trains with the score's coordinates themselves: it ranks a
pruning-at-initialization score (ZO-GraSP) globally, keeps only the **per-layer counts** (LPR), and draws a
fresh uniform coordinate set with those counts every few steps. Every task that trains the DeepZero way
(ZO-SOL, CIFAR-10, the defense's denoiser, ``bbzo train --lpr``, ``bbzo prune``) calls these functions:

* :func:`layer_ratios` -- score the model, turn the scores into a :class:`~bbzo.sparsity.lpr.LayerRatios`, and
  cache it as ``lpr.json`` (a resumed run reads it back instead of scoring again);
* :func:`dynamic_sparse_cge` -- a masked coordinate estimator drawing the LPR's counts per layer, redrawn every
  ``resample_every`` steps (:class:`~bbzo.sparsity.sampler.DynamicSparsity`); optionally completed by the
  objective's stop-gradient surrogate (``hybrid_cge``);
* :func:`sparse_cge_from_score` -- both, the whole recipe in one call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..estimators import create_estimator, hybrid, masked
from ..estimators.transforms import Masked
from ..ledger import QueryLedger
from .lpr import LayerRatios, ratios_from_scores
from .sampler import DynamicSparsity
from .scores import compute_score, score_accepts

__all__ = ["layer_ratios", "dynamic_sparse_cge", "sparse_cge_from_score"]


def layer_ratios(score: str, model: nn.Module, objective: Any, inputs: Any, targets: Any, *, sparsity: float,
                 seed: int = 0, ledger: Optional[QueryLedger] = None, include: Optional[Sequence[str]] = None,
                 score_options: Optional[Mapping[str, Any]] = None,
                 adapter_factory: Optional[Callable[[nn.Module], Any]] = None, model_name: str = "unknown",
                 cache: Optional[Union[str, Path]] = None, reuse: bool = False,
                 extra: Optional[Mapping[str, Any]] = None, strict_options: bool = False) -> LayerRatios:
    """Score ``model`` with ``score`` on the batch ``(inputs, targets)`` and keep each layer's share at ``sparsity``.

    Args:
        score_options: Options offered to the score; those it does not take are left out (``q``, ``mu``...), or
            refused with the list of its options if ``strict_options`` (a user's ``bbzo prune --option``).
        include: Tensors to score (default: Conv/Linear weights, :func:`~bbzo.sparsity.scores.prunable_params`).
        ledger: Where the score's queries are charged (``LayerRatios.queries`` records them).
        cache: Write the LPR there (``lpr.json``); with ``reuse`` and an existing file, read it instead of scoring.
        extra: More provenance for the file (seconds, scoring images...).
    """
    if cache is not None and reuse and Path(cache).exists():
        return LayerRatios.load(cache)
    options = {k: v for k, v in (score_options or {}).items()
               if v is not None and (strict_options or score_accepts(score, k))}
    res = compute_score(score, model, objective, inputs, targets, include=include, seed=seed, ledger=ledger,
                        adapter_factory=adapter_factory, **options)
    lpr = ratios_from_scores(res.scores, sparsity, keep=res.keep, model=model_name, score=score, seed=seed,
                             queries=res.queries,
                             extra={**{k: str(v) for k, v in res.info.items()}, "seconds": round(res.seconds, 2),
                                    **dict(extra or {})})
    if cache is not None:
        lpr.save(cache)
    return lpr


def dynamic_sparse_cge(lpr: LayerRatios, params: Mapping[str, torch.Tensor], *, mu: float = 5e-3,
                       resample_every: int = 0, seed: int = 0, others: str = "dense", difference: str = "forward",
                       surrogate: bool = False, estimator: Optional[Masked] = None) -> Any:
    """Sparse-CGE drawing, per layer, the LPR's number of uniformly random coordinates (redrawn every
    ``resample_every`` steps; DeepZero Alg. 2). Tensors the LPR does not name follow ``others``
    (``dense`` / ``sparse`` / ``frozen``).

    Args:
        surrogate: Complete the sparse estimate with the objective's stop-gradient surrogate (``hybrid_cge``).
        estimator: A ``sparse_cge`` to draw for (its ``mu``, ``difference`` and ``dense`` patterns are kept);
            default ``masked(cge(mu, difference))``.

    Returns:
        The estimator; plain ``cge`` when the draws would hold every coordinate of every parameter anyway.
    """
    sampler = DynamicSparsity(lpr, params, resample_every=resample_every, seed=seed, others=others)
    if estimator is None and not surrogate and sampler.coords_per_step == sum(int(p.numel()) for p in params.values()):
        return create_estimator("cge", mu=mu, difference=difference)
    base = estimator if estimator is not None else masked(create_estimator("cge", mu=mu, difference=difference), {})
    est = base.with_schedule(sampler)
    return hybrid(est) if surrogate else est


def sparse_cge_from_score(score: str, model: nn.Module, objective: Any, inputs: Any, targets: Any, *,
                          sparsity: float, mu: float = 5e-3, resample_every: int = 0, seed: int = 0,
                          others: str = "dense", surrogate: bool = False, scored_model: Optional[nn.Module] = None,
                          **lpr_kw: Any) -> tuple[Any, LayerRatios]:
    """DeepZero's recipe: :func:`layer_ratios` (of ``scored_model``, default ``model``) then
    :func:`dynamic_sparse_cge` over ``model``'s trainable parameters. Returns ``(estimator, lpr)``."""
    lpr = layer_ratios(score, scored_model if scored_model is not None else model, objective, inputs, targets,
                       sparsity=sparsity, seed=seed, **lpr_kw)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    est = dynamic_sparse_cge(lpr, params, mu=mu, resample_every=resample_every, seed=seed, others=others,
                             surrogate=surrogate)
    return est, lpr
