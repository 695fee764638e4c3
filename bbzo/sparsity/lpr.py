"""Layer-wise pruning ratios (LPR): how many coordinates of each tensor a sparse gradient keeps.

DeepZero (§4, Alg. 1) ranks a pruning-at-initialization score *globally* at the requested sparsity and
keeps only the resulting **per-layer fractions**; the positions inside a layer are then drawn at random
(and re-drawn, :mod:`bbzo.sparsity.sampler`). An LPR file is readable JSON::

    {"format": "bbzo-lpr/1", "model": "resnet20", "score": "zo_grasp", "sparsity": 0.9, "seed": 0,
     "queries": 386, "keep": "largest_abs",
     "kept_fraction": {"conv1.weight": 0.81, ...}, "kept": {"conv1.weight": 350, ...},
     "size": {"conv1.weight": 432, ...}, "extra": {...}}
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Union

import torch

from ..errors import ConfigError

__all__ = ["LayerRatios", "ratios_from_scores", "uniform_ratios", "KEEP_RULES"]

FORMAT = "bbzo-lpr/1"
#: How a score is turned into a ranking: keep the largest |S|, the largest S, or the smallest S
#: (original GraSP keeps the lowest -theta*Hg; DeepZero's reference ranks |S|).
KEEP_RULES = ("largest_abs", "largest", "smallest")


@dataclass
class LayerRatios:
    """Per-tensor kept counts at a global sparsity, plus where they came from.

    Attributes:
        kept: ``{param name: number of coordinates kept}``.
        size: ``{param name: numel}``.
        sparsity: Requested global sparsity in [0, 1) (fraction of coordinates *not* kept).
        model, score, seed, queries, keep: Provenance (``queries``: oracle queries the score used).
        extra: Anything else worth recording (score options, seconds, ...).
    """

    kept: dict[str, int]
    size: dict[str, int]
    sparsity: float
    model: str = "unknown"
    score: str = "unknown"
    seed: int = 0
    queries: int = 0
    keep: str = "largest_abs"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.kept) != set(self.size):
            raise ConfigError("LayerRatios: 'kept' and 'size' must name the same tensors.")
        for n, k in self.kept.items():
            if not 0 <= int(k) <= int(self.size[n]):
                raise ConfigError(f"LayerRatios: {n!r} keeps {k} of {self.size[n]} coordinates.")
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}.")

    @property
    def kept_fraction(self) -> dict[str, float]:
        return {n: self.kept[n] / self.size[n] if self.size[n] else 0.0 for n in self.kept}

    @property
    def total_kept(self) -> int:
        return sum(self.kept.values())

    @property
    def total_size(self) -> int:
        return sum(self.size.values())

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "model": self.model, "score": self.score, "sparsity": self.sparsity,
            "seed": self.seed, "queries": self.queries, "keep": self.keep,
            "total_kept": self.total_kept, "total_size": self.total_size,
            "kept_fraction": {n: round(f, 6) for n, f in self.kept_fraction.items()},
            "kept": dict(self.kept), "size": dict(self.size), "extra": self.extra,
        }

    def save(self, path: Union[str, Path]) -> Path:
        """Write the JSON atomically (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerRatios":
        if d.get("format") != FORMAT or "kept" not in d or "size" not in d:
            raise ConfigError(
                f"not a bbzo LPR file (expected format {FORMAT!r} with 'kept' and 'size'). "
                "Make one with `bbzo prune --out lpr.json`."
            )
        return cls(kept={k: int(v) for k, v in d["kept"].items()}, size={k: int(v) for k, v in d["size"].items()},
                   sparsity=float(d["sparsity"]), model=d.get("model", "unknown"), score=d.get("score", "unknown"),
                   seed=int(d.get("seed", 0)), queries=int(d.get("queries", 0)), keep=d.get("keep", "largest_abs"),
                   extra=dict(d.get("extra") or {}))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "LayerRatios":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"LPR file {path} does not exist. Make one with `bbzo prune ... --out {path}`.")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"LPR file {path} is not valid JSON ({e}). Re-create it with `bbzo prune`.") from e
        return cls.from_dict(d)

    def check_model(self, params: Mapping[str, torch.Tensor]) -> None:
        """Raise a clear error if the LPR does not fit these parameters."""
        for n, size in self.size.items():
            if n not in params:
                raise ConfigError(f"LPR ({self.model}) names {n!r}, which this model does not have as a trainable "
                                  "parameter. Make the LPR for this model with `bbzo prune --model ...`.")
            if params[n].numel() != size:
                raise ConfigError(f"LPR says {n!r} has {size} coordinates, this model's has {params[n].numel()}. "
                                  "Make the LPR for this model with `bbzo prune --model ...`.")


def _ranking_key(score: torch.Tensor, keep: str) -> torch.Tensor:
    if keep == "largest_abs":
        return score.abs()
    if keep == "largest":
        return score
    if keep == "smallest":
        return -score
    raise ConfigError(f"keep must be one of {KEEP_RULES}, got {keep!r}.")


def ratios_from_scores(scores: Mapping[str, torch.Tensor], sparsity: float, keep: str = "largest_abs",
                       **meta: Any) -> LayerRatios:
    """Rank every coordinate of every scored tensor *globally* and count the survivors per tensor.

    Exactly ``round((1 - sparsity) * D)`` coordinates are kept (``D`` = total scored coordinates), so
    the per-layer counts sum to the requested sparsity up to rounding. Ties are broken by position
    (stable sort), so the result is deterministic.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}.")
    if not scores:
        raise ConfigError("no scores to rank.")
    names = list(scores)
    keys = torch.cat([_ranking_key(scores[n].detach().reshape(-1).double().cpu(), keep) for n in names])
    if bool(torch.isnan(keys).any()):
        raise ConfigError("scores contain NaN; cannot rank them.")
    total = keys.numel()
    n_keep = int(round((1.0 - sparsity) * total))
    order = torch.argsort(keys, descending=True, stable=True)[:n_keep]
    owner = torch.repeat_interleave(torch.arange(len(names)), torch.tensor([scores[n].numel() for n in names]))
    counts = torch.bincount(owner[order], minlength=len(names))
    return LayerRatios(kept={n: int(c) for n, c in zip(names, counts.tolist())},
                       size={n: int(scores[n].numel()) for n in names}, sparsity=float(sparsity), keep=keep, **meta)


def uniform_ratios(sizes: Mapping[str, int], sparsity: float, **meta: Any) -> LayerRatios:
    """The same kept fraction in every tensor (``ceil``/``floor`` so the total is exact up to one per tensor)."""
    kept = {n: int(math.floor((1.0 - sparsity) * s + 0.5)) for n, s in sizes.items()}
    return LayerRatios(kept=kept, size={n: int(s) for n, s in sizes.items()}, sparsity=float(sparsity), **meta)
