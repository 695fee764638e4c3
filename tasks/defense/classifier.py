"""Train a classifier to serve as the black box (the *owner's* training, first-order; nothing ZO happens here).

Users bring their own classifier, or train one with ``bbzo defense classifier`` (the run lifecycle below:
progress bar, checkpoints, ``--resume``); the CPU-scale benchmark (``benchmarks/defense_small.py``) uses
:func:`train_classifier`. Both: SGD with Nesterov momentum, cosine decay, random crop (``pad`` px) and
horizontal flip, on clean images, inputs normalized with ``mean``/``std`` as the
:class:`~bbzo.oracles.classifier.ClassifierOracle` will.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bbzo.errors import ConfigError

__all__ = ["train_classifier", "clean_accuracy", "AugmentedBatches", "prepare_classifier", "build_classifier",
           "evaluate_classifier"]


def _augment(x: torch.Tensor, g: torch.Generator, pad: int) -> torch.Tensor:
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    if pad <= 0:
        return x
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    rows = (dy.view(b, 1) + torch.arange(h).view(1, h))  # (B, H)
    cols = (dx.view(b, 1) + torch.arange(w).view(1, w))  # (B, W)
    idx_b = torch.arange(b).view(b, 1, 1)
    return xp.permute(0, 2, 3, 1)[idx_b, rows.view(b, h, 1), cols.view(b, 1, w)].permute(0, 3, 1, 2).contiguous()


def train_classifier(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int, batch: int = 128,
                     lr: float = 0.1, weight_decay: float = 5e-4, mean: Sequence[float], std: Sequence[float],
                     seed: int = 0, pad: int = 4, device: Any = "cpu",
                     progress: Optional[Callable[[int, float], None]] = None) -> nn.Module:
    """Train ``net`` on ``images (N, 3, H, W)`` in [0, 1]; returns it in eval mode."""
    n = images.shape[0]
    if not 1 <= batch <= n or epochs < 1:
        raise ConfigError(f"need 1 <= batch <= {n} and epochs >= 1.")
    net.to(device).train()
    m = torch.tensor(mean).view(1, -1, 1, 1).to(device)
    s = torch.tensor(std).view(1, -1, 1, 1).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    steps = epochs * (n // batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        total = 0.0
        for i in range(n // batch):
            idx = perm[i * batch:(i + 1) * batch]
            x = _augment(images[idx], g, pad).to(device)
            loss = F.cross_entropy(net((x - m) / s), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        if progress is not None:
            progress(epoch, total / max(1, n // batch))
    return net.eval()


@torch.no_grad()
def clean_accuracy(classify: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
                   batch: int = 500) -> float:
    """Top-1 accuracy (%) of ``classify`` (images in [0, 1] -> logits) on clean images."""
    hit = sum(int((classify(images[i:i + batch]).argmax(1).cpu() == labels[i:i + batch]).sum())
              for i in range(0, images.shape[0], batch))
    return round(100.0 * hit / max(1, images.shape[0]), 3)


# ---------------------------------------------------------------------------------- bbzo defense classifier
class AugmentedBatches:
    """``get_batch(step) -> ((aug(x) - mean) / std (B, C, H, W), labels (B,))``: flips and ``pad``-pixel crops
    drawn from ``(seed, step)``, so a resumed run sees the batches an uninterrupted one would."""

    def __init__(self, clean: Any, mean: Sequence[float], std: Sequence[float], pad: int, seed: int,
                 device: Any = "cpu") -> None:
        self.clean, self.pad, self.seed, self.device = clean, int(pad), int(seed), device
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.steps_per_epoch = clean.steps_per_epoch

    def get_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.clean.get_batch(step)
        g = torch.Generator().manual_seed((self.seed + 104_729) * 1_000_003 + int(step))
        x = _augment(x.cpu(), g, self.pad)
        return ((x - self.mean) / self.std).to(self.device), y.to(self.device)


def prepare_classifier(s: Any, run: Any) -> dict[str, Any]:
    """The data (no image read yet) and its record ``OUT/data.json``; the architecture builds before any image is read."""
    import json

    from bbzo import parallel
    from bbzo.oracles.classifier import build_classifier as build_net

    from .data import open_images

    data = open_images(s.data, splits=("train", "test"), subset=s.subset, test_subset=s.test_subset, seed=s.seed,
                       image_size=s.image_size, crop_pct=s.crop_pct)
    k = s.num_classes or data.num_classes
    if k < data.num_classes:
        raise ConfigError(f"--num-classes {k} but {s.data} has {data.num_classes} classes; use --num-classes 0 "
                          "(the data's count).")
    build_net(s.classifier, k)
    if parallel.is_writer():
        (run.folder / "data.json").write_text(json.dumps(data.describe(), indent=1) + "\n")
    return {"data": data, "num_classes": k}


def build_classifier(s: Any, name: str, ctx: Any) -> Any:
    """The owner's training of the black box as a run: cross-entropy, autograd, SGD, cosine per step."""
    import bbzo
    from bbzo.objective import FunctionObjective
    from bbzo.oracles.classifier import build_classifier as build_net
    from bbzo.run import Training

    from .data import NoisyBatches, iter_rows

    data = ctx.shared["data"]
    torch.manual_seed(s.seed)
    net = build_net(s.classifier, ctx.shared["num_classes"]).to(s.device).train()
    labels = data.train.labels[data.train_rows]
    clean = NoisyBatches(data.train, labels, s.batch, 0.0, seed=s.seed, device="cpu", rows=data.train_rows,
                         workers=s.loader_workers)
    batches = AugmentedBatches(clean, s.mean, s.std, s.pad, s.seed, s.device)
    spe = batches.steps_per_epoch
    steps = s.steps or s.epochs * spe
    opt = torch.optim.SGD(net.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)))
    m = torch.tensor(s.mean).view(1, -1, 1, 1).to(s.device)
    sd = torch.tensor(s.std).view(1, -1, 1, 1).to(s.device)

    def evaluate(model: nn.Module) -> dict[str, Any]:
        was = model.training
        model.eval()
        batches_ = iter_rows(data.test, data.test_rows, 500, workers=s.loader_workers, device=s.device)
        acc = clean_accuracy_batches(lambda x: model((x.to(s.device) - m) / sd), batches_,
                                     desc="clean test accuracy", total=int(data.test_rows.numel()))
        model.train(was)
        return {"test_acc": acc}

    def ce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets, reduction="none")

    return Training(model=net, objective=FunctionObjective(ce), estimator=bbzo.create_estimator("autograd"),
                    optimizer=opt, scheduler=sched, data=batches, steps=steps, evaluate=evaluate,
                    eval_every=s.eval_every or spe, checkpoint_every=s.checkpoint_every,
                    desc=f"classifier {s.classifier} (first-order)", log_extra={"method": "classifier"},
                    summary=lambda tr: {"steps_per_epoch": spe, "epochs": round(tr.step_count / spe, 3),
                                        "classifier": s.classifier, "num_classes": ctx.shared["num_classes"]})


@torch.no_grad()
def clean_accuracy_batches(classify: Callable[[torch.Tensor], torch.Tensor], batches: Any, *, desc: str = "",
                           total: Optional[int] = None) -> float:
    """Top-1 accuracy (%) of ``classify`` over ``(images, labels)`` batches, with a bar counting images."""
    from bbzo.listeners import counting

    hit = seen = 0
    with counting(desc or "accuracy", total=total, unit="img") as tick:
        for x, y in batches:
            hit += int((classify(x).argmax(1).cpu() == y).sum())
            seen += int(x.shape[0])
            tick(int(x.shape[0]))
    return round(100.0 * hit / max(1, seen), 3)


def evaluate_classifier(s: Any, run: Any, summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The results: accuracy before and after, the training's cost, and the flags that use it as the black box."""
    from bbzo.config import as_plain

    t = summaries[""]
    k = run.shared["num_classes"]
    weights = run.folder / "model.pt"
    row = {"classifier": s.classifier, "params": t.get("params"), "steps": t.get("steps"), "epochs": t.get("epochs"),
           "train_s": t.get("train_s", t.get("wall_s")), "s_per_epoch": t.get("train_s_per_epoch"),
           "test_acc_before": t.get("eval_initial", {}).get("test_acc"),
           "test_acc": t.get("eval_final", {}).get("test_acc")}
    use = f"--classifier {s.classifier} --weights {weights} --num-classes {k}"
    table = ("| classifier | params | epochs | steps | training [s] | s/epoch | clean test acc before [%] | after [%] |\n"
             "|---|---:|---:|---:|---:|---:|---:|---:|\n"
             f"| {s.classifier} | {row['params']:,} | {row['epochs']} | {row['steps']} | {row['train_s']} | "
             f"{row['s_per_epoch']} | {row['test_acc_before']} | {row['test_acc']} |\n\n"
             f"test images: {int(run.shared['data'].test_rows.numel()):,} (clean, no noise). The black box of the other "
             f"defense commands: {use}")
    return {"config": as_plain(s), "results": row, "weights": str(weights), "use_with": use,
            "data": run.shared["data"].describe(), "table": table}

