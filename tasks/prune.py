"""Layer-wise pruning ratios (LPR) of a model from a pruning score: the work behind ``bbzo prune``.

The loss is the mean cross-entropy of the model (train-mode BN) on a class-balanced batch of images,
the DeepZero protocol; the LPR (readable JSON) feeds ``bbzo train --lpr lpr.json --resample-every N``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from bbzo.config import setting
from bbzo.errors import ConfigError
from bbzo.sparsity import LayerRatios, layer_ratios, list_scores

__all__ = ["PruneSettings", "prune_model"]


@dataclass
class PruneSettings:
    model: str = setting("resnet20", help="Model to score: a registered name (see `bbzo models`) or a builder "
                         "reference 'pkg.mod:fn' / 'path/file.py:fn' returning an nn.Module.")
    score: str = setting("zo_grasp", help="Pruning score (see `bbzo prune --list`): zo_grasp, zo_grasp_oracle, "
                         "zo_grasp_sketch, fo_grasp, snip, magnitude, random, layer_noise.")
    sparsity: float = setting(0.9, help="Global fraction of scored coordinates NOT kept, in [0, 1).")
    out: Path = setting(Path("lpr.json"), kind="path", help="Where to write the LPR JSON.")
    data: Optional[Path] = setting(None, kind="path", help=(
        "Scoring images: .npz (train_x/train_y, ...) or a cifar-10-batches-py folder. Needed by data-dependent scores."))
    per_class: int = setting(25, help="Scoring batch: this many training images per class (DeepZero: 25 -> 250 images).")
    seed: int = setting(0, help="Model init and score seed.")
    options: dict[str, Any] = setting(default_factory=dict, cli=False, help="Score options (--option KEY=VALUE).")
    include: tuple[str, ...] = setting((), cli=False, help="Score these parameters instead of all Conv/Linear weights.")
    num_classes: int = setting(10, help="Classifier outputs.")
    device: str = setting("cpu", help="cpu, cuda, cuda:1, ...")


def _build(s: PruneSettings) -> torch.nn.Module:
    torch.manual_seed(s.seed)
    if ":" in s.model:  # a user's builder, e.g. mypkg.net:build or path/to/net.py:build
        from bbzo.references import build_model

        return build_model(s.model)
    from bbzo.models import create_model
    from bbzo.models.registry import model_builder

    accepted = inspect.signature(model_builder(s.model)).parameters
    return create_model(s.model, **({"num_classes": s.num_classes} if "num_classes" in accepted else {}))


def prune_model(s: PruneSettings) -> LayerRatios:
    """Score the model at initialization and write its LPR to ``s.out``."""
    infos = {i.name: i for i in list_scores(with_info=True)}
    if s.score not in infos:
        raise ConfigError(f"unknown score {s.score!r}; choose from {', '.join(sorted(infos))}.")
    model = _build(s).to(s.device).train()
    x = y = None
    if infos[s.score].needs_data:
        if s.data is None:
            raise ConfigError(f"score {s.score!r} needs scoring images: pass --data path/to/cifar10.npz "
                              "(or use a data-free score: magnitude, random, layer_noise).")
        from bbzo.tasks.cifar import class_balanced_subset, load_image_classification

        xs, ys = load_image_classification(s.data, "train")
        idx = class_balanced_subset(ys, s.per_class)
        x, y = xs[idx].to(s.device), ys[idx].to(s.device)

    def ce(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(o, t, reduction="none")

    return layer_ratios(s.score, model, ce, x, y, sparsity=s.sparsity, seed=s.seed, include=list(s.include) or None,
                        score_options=s.options, strict_options=True, model_name=s.model, cache=s.out,
                        extra={"scoring_images": 0 if x is None else int(x.shape[0])})
