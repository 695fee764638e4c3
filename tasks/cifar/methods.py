"""The four CIFAR-10 methods, each a :class:`~bbzo.run.Training` of the shared run lifecycle.

The whole network is the black box's input here: only its minibatch loss is queried (the "plain CIFAR
models" oracle of the design card), through the feature-reuse adapter bbzo picks for the model.

* ``fo``       -- the ``autograd`` estimator: a white-box reference, **not** zeroth-order;
* ``cge``      -- CGE on every coordinate (d + 1 queries per step);
* ``rge``      -- RGE with ``q`` Gaussian directions (default q = d: CGE's query count);
* ``deepzero`` -- DeepZero's Algorithm 2: ZO-GraSP scores the conv/linear weights once (query-only), the
  layer-wise keep ratios at ``sparsity`` follow, and every step runs CGE on a uniform draw at those
  ratios (redrawn every ``resample_every`` steps) plus every BN parameter and bias (dense, as the reference).

BatchNorm: each query evaluates the perturbed network in train mode with its own batch statistics (the
loss FO differentiates); one unperturbed forward per step updates the running statistics.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import bbzo
from bbzo.models import create_model
from bbzo.optim import cosine_with_warmup, make_optimizer
from bbzo.run import BuildContext, Training
from bbzo.sparsity import sparse_cge_from_score
from bbzo.sparsity.scores.registry import prunable_params

from .data import CifarBatches, CifarData, normalize
from .settings import CifarSettings

__all__ = ["cross_entropy", "make_model", "make_batches", "accuracy", "build_method", "total_steps",
           "warn_if_never_decays"]

RESAMPLE_EPOCHS = 5  # DeepZero's --mask-shuffle-interval


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy ``(N,)`` (the queried loss)."""
    return F.cross_entropy(logits, labels, reduction="none")


def make_model(s: CifarSettings, data: CifarData) -> nn.Module:
    torch.manual_seed(s.seed)
    return create_model(s.model, num_classes=data.num_classes).to(s.device).train()


def make_batches(s: CifarSettings, data: CifarData) -> CifarBatches:
    return CifarBatches(data.train_x, data.train_y, s.batch, seed=s.seed, augment=s.augment, device=s.device)


def total_steps(s: CifarSettings, steps_per_epoch: int) -> int:
    return s.steps or s.epochs * steps_per_epoch


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, batch: int = 500,
             progress: bool = False) -> dict[str, Any]:
    """Eval-mode accuracy (%), mean loss and per-class accuracy (%) of ``x`` in [0, 1] (``progress``: a bar)."""
    from bbzo.listeners import counting

    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    correct = torch.zeros(num_classes, dtype=torch.long)
    count = torch.bincount(y, minlength=num_classes)
    loss = 0.0
    with counting("test accuracy", total=int(x.shape[0]), unit="img", enabled=progress) as tick:
        for i in range(0, x.shape[0], batch):
            xb, yb = normalize(x[i:i + batch]).to(dev), y[i:i + batch].to(dev)
            out = model(xb)
            loss += float(F.cross_entropy(out, yb, reduction="sum"))
            hit = (out.argmax(1) == yb).cpu()
            correct += torch.bincount(yb.cpu()[hit], minlength=num_classes)
            tick(int(xb.shape[0]))
    model.train(was)
    per = (100.0 * correct.double() / count.clamp_min(1).double()).tolist()
    return {"test_acc": round(100.0 * float(correct.sum()) / max(1, x.shape[0]), 3),
            "test_loss": round(loss / max(1, x.shape[0]), 5), "per_class": [round(v, 2) for v in per]}


def _evaluator(data: CifarData, progress: bool = False) -> Callable[[nn.Module], dict[str, Any]]:
    def evaluate(model: nn.Module) -> dict[str, Any]:
        r = accuracy(model, data.test_x, data.test_y, data.num_classes, progress=progress)
        return {"test_acc": r["test_acc"], "test_loss": r["test_loss"]}
    return evaluate


def _deepzero(s: CifarSettings, ctx: BuildContext, model: nn.Module, batches: CifarBatches) -> tuple[Any, dict]:
    from bbzo.listeners import activity

    x, y = batches.get_batch(0)
    every = s.resample_every or RESAMPLE_EPOCHS * batches.steps_per_epoch
    cached = ctx.resuming and (ctx.folder / "lpr.json").exists()
    what = f"{s.score}, q = {s.score_q}, on a batch of {int(y.shape[0])}" + ("; reusing lpr.json" if cached else "")
    with activity(f"{ctx.name}: layer ratios at {s.sparsity:.1%} sparsity", enabled=ctx.run.progress, what=what):
        est, lpr = sparse_cge_from_score(
            s.score, model, cross_entropy, x, y, sparsity=s.sparsity, mu=s.mu, resample_every=every, seed=s.seed,
            others="dense", include=prunable_params(model), ledger=ctx.ledger,
            score_options={"q": s.score_q, "mu": s.mu}, model_name=s.model, cache=ctx.folder / "lpr.json",
            reuse=ctx.resuming)
    coords = est.query_cost({n: p.detach() for n, p in model.named_parameters()}) - 1
    return est, {"score_queries": lpr.queries, "resample_every": every, "coords_per_step": coords,
                 "kept_per_layer": dict(lpr.kept)}


def build_method(s: CifarSettings, name: str, ctx: BuildContext) -> Training:
    data: CifarData = ctx.shared
    model = make_model(s, data)
    batches = make_batches(s, data)
    d = sum(p.numel() for p in model.parameters())
    extra: dict[str, Any] = {}
    if name == "fo":
        est = bbzo.create_estimator("autograd")
    elif name == "cge":
        est = bbzo.create_estimator("cge", mu=s.mu)
    elif name == "rge":
        est = bbzo.create_estimator("rge", q=s.q or d, mu=s.mu, seed=s.seed)
    else:
        est, extra = _deepzero(s, ctx, model, batches)
    steps = total_steps(s, batches.steps_per_epoch)
    opt = make_optimizer(model.parameters(), s.optimizer, lr=s.lr_of(name), momentum=s.momentum, weight_decay=s.weight_decay)
    warm = min(steps, int(round(s.warmup_epochs * batches.steps_per_epoch)))
    sched = cosine_with_warmup(opt, max(1, steps), warmup_steps=warm) if s.schedule == "cosine" else None
    if sched is not None:
        warn_if_never_decays(int(round(s.warmup_epochs * batches.steps_per_epoch)), steps,
                             f"--warmup-epochs {s.warmup_epochs:g}", s.lr_of(name))
    q = est.query_cost({n: p.detach() for n, p in model.named_parameters()})
    spe = batches.steps_per_epoch
    return Training(
        model=model, objective=cross_entropy, estimator=est, optimizer=opt, scheduler=sched, data=batches,
        steps=steps, evaluate=_evaluator(data, ctx.run.progress), eval_every=s.eval_every or spe, checkpoint_every=s.checkpoint_every,
        weights="model.pt", desc=f"{name} ({q} q/step)" if est.info.zeroth_order else f"{name} (autograd)",
        log_extra={"method": name, "epoch_steps": spe},
        summary=lambda tr: {"steps_per_epoch": spe, "epochs": round(tr.step_count / spe, 3), "model": s.model, **extra})


def warn_if_never_decays(warm: int, steps: int, flag: str, lr: float) -> bool:
    """Warn when a warm-up covers the whole run: the rate only rises to ``lr`` and the cosine decay never starts."""
    if warm <= 0 or warm < steps:
        return False
    import warnings

    from bbzo.errors import InefficientSettingsWarning

    warnings.warn(InefficientSettingsWarning(
        f"{flag} is {warm} steps, and the run has {steps}: the learning rate rises linearly towards {lr:g} for the "
        "whole run and never decays. Use --warmup-epochs 0 (cosine from the first step) or train longer."),
        stacklevel=2)
    return True
