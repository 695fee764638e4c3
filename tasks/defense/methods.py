"""The trainings of the defense: MSE pretraining, and the fine-tuning methods zo / fo / zo-ds.

All three fine-tunings minimise the stability objective ``CE(f(D(x + delta)), argmax f(x))`` (Salman et al.;
DeepZero Eq. A2) with one noise draw per (image, step) shared by every query of the step:

* ``zo``    -- DeepZero: ZO-GraSP scores the pretrained denoiser's conv weights (queries only, at
  ``grasp_sparsity``), then forward-difference CGE on ``budget`` coordinates per step of the fine-tuned
  layers (``layers=last``: the last conv, the paper's outcome; ``grasp``: every conv at the ZO-GraSP ratios,
  scaled to the budget), redrawn every ``resample_every`` steps. The last conv is linear in its weights, so
  the staged adapter makes every perturbed image a gather-and-add of the cached features (no convolution):
  per query only the black box runs. ``budget + 1`` queries of ``B`` images per step;
* ``fo``    -- FO-DS: autograd *through the classifier*, every denoiser parameter -- **white-box**, the
  upper reference, not a black-box method;
* ``zo-ds`` -- ZO-AE-DS's estimator without the autoencoder: RGE with ``q`` directions in the denoised
  image's space, then autograd through the denoiser (the chain-rule ``oracle_rge``). ``q + 1`` queries.

The denoiser is any module (:mod:`.denoisers`). ``zo`` perturbs the layers named above through the staged
adapter when the denoiser declares stages (DnCNN, an ``nn.Sequential``, any ``bbzo_stages``) and through the
functional (``vmap``) adapter otherwise; "the last conv" of a denoiser without DnCNN's ``dncnn`` layers is its
last Conv/Linear weight in registration order. With ``adapter_width > 0`` the denoiser is frozen and a small
DnCNN after it is fine-tuned instead (:class:`~.denoisers.AdaptedDenoiser`; its last conv for ``layers=last``).

The denoiser's BatchNorm stays in eval mode while fine-tuning (frozen statistics, so cached features and
every query of a step see the same network).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import bbzo
from bbzo.errors import ConfigError
from bbzo.models.dncnn import DnCNN
from bbzo.optim import make_optimizer
from bbzo.objective import FunctionObjective, OracleObjective
from bbzo.oracles.classifier import ClassifierOracle, load_classifier, log_probs
from bbzo.run import BuildContext, Training
from bbzo.sparsity import LayerRatios, dynamic_sparse_cge, layer_ratios
from bbzo.sparsity.scores.registry import prunable_params

from .data import ImageData, NoisyBatches, iter_rows
from .denoisers import AdaptedDenoiser, build_denoiser, can_finetune, frozen, load_denoiser_source, sha256, spec_of
from .settings import DefenseBase, FinetuneSettings, PretrainSettings

__all__ = ["make_oracle", "make_denoiser", "load_denoiser", "stability_targets", "noisy_accuracy", "psnr",
           "build_pretrain", "build_finetune", "budget_ratios", "RESAMPLE_EPOCHS", "finetuned_denoiser",
           "last_weight"]

RESAMPLE_EPOCHS = 5  # DeepZero's --mask-shuffle-interval

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def make_oracle(s: DefenseBase, name: str = "classifier", net: Any = None,
                classes: Optional[list[list[int]]] = None) -> ClassifierOracle:
    """The query-only classifier of the settings (``net``: reuse an already loaded one; ``classes``: a class map)."""
    net = net if net is not None else load_classifier(s.classifier, s.weights, s.num_classes)
    return ClassifierOracle(net, mean=s.mean, std=s.std, output=s.output, max_batch=s.max_batch, name=name,
                            classes=classes).to(s.device)


def make_denoiser(s: DefenseBase) -> nn.Module:
    """An untrained denoiser of the settings' architecture (seeded), its spec recorded in its state dict."""
    torch.manual_seed(s.seed)
    return build_denoiser(s.denoiser_spec()).to(s.device)


def load_denoiser(s: DefenseBase, path: Any) -> Any:
    """The denoiser ``path`` names (a weights file, a compiled file or a reference), trainable, on the device.

    A file that records its architecture is rebuilt from it; others use the flags (``--denoiser-arch``,
    ``--depth``, ``--width``).
    """
    if path is None:
        raise ConfigError("no denoiser given: pass --denoiser runs/.../model.pt (train one with `bbzo defense pretrain`).")
    return load_denoiser_source(str(path), s.denoiser_spec(), s.device)


def finetuned_denoiser(s: FinetuneSettings) -> nn.Module:
    """What ``finetune`` trains: the pretrained denoiser, or (``adapter_width > 0``) an adapter after it."""
    base = load_denoiser(s, s.denoiser)
    if s.adapter_width <= 0:
        why = can_finetune(base)
        if why is not None:
            raise ConfigError(f"--denoiser {s.denoiser} is {why}: bbzo cannot perturb its weights. Fine-tune a small "
                              "adapter after it (--adapter-width 16), or give the denoiser as module:attr.")
        return base
    source = str(s.denoiser)
    path = Path(source)
    base_spec = {"source": str(path.resolve()) if path.is_file() else source,
                 "sha256": sha256(path) if path.is_file() else None, "spec": spec_of(base)}
    torch.manual_seed(s.seed)
    return AdaptedDenoiser(frozen(base), base_spec, depth=s.adapter_depth, width=s.adapter_width).to(s.device)


@torch.no_grad()
def stability_targets(oracle: ClassifierOracle, images: Any, device: Any = "cpu", batch: int = 512,
                      rows: Optional[torch.Tensor] = None, workers: int = 0, progress: bool = False) -> torch.Tensor:
    """``argmax f(x)`` of the clean images ``(N,)`` (one query per image, charged to the oracle's ledger).

    ``images``: a ``(N, C, H, W)`` tensor, or an :class:`~.data.ImageSplit` read at ``rows`` (streamed).
    ``progress``: a bar counting the images labelled.
    """
    from bbzo.listeners import counting

    if isinstance(images, torch.Tensor):
        total = int(images.shape[0])
        batches: Batches = ((images[i:i + batch], None) for i in range(0, images.shape[0], batch))
    else:
        rows = rows if rows is not None else torch.arange(len(images))
        total = int(rows.numel())
        batches = iter_rows(images, rows, batch, workers=workers, device=device)
    out = []
    with counting("labels argmax f(x) (classifier queries)", total=total, unit="img", enabled=progress) as tick:
        for x, _ in batches:
            out.append(oracle.query(x.to(device)).argmax(1).cpu())
            tick(int(x.shape[0]))
    return torch.cat(out)


def stability_loss(answers: torch.Tensor, outputs: Any, inputs: Any, targets: torch.Tensor, *, output: str = "logits"
                   ) -> torch.Tensor:
    """Per-sample CE ``(N,)`` of the black box's answers against ``argmax f(x)``."""
    return F.nll_loss(log_probs(answers, output), targets, reduction="none")


def _batches(x: Any, y: Optional[torch.Tensor], batch: int) -> Batches:
    """Tensors -> batches; anything else is taken to be batches already (``iter_rows``)."""
    if isinstance(x, torch.Tensor):
        return ((x[i:i + batch], y[i:i + batch] if y is not None else None) for i in range(0, x.shape[0], batch))
    return x


@torch.no_grad()
def noisy_accuracy(denoiser: Optional[nn.Module], classify: Callable[[torch.Tensor], torch.Tensor], x: Any,
                   y: Optional[torch.Tensor], sigma: float, seed: int = 0, batch: int = 256, device: Any = "cpu",
                   progress: bool = False, count: Optional[int] = None) -> float:
    """Top-1 accuracy (%) of ``f(D(x + delta))`` with one fixed noise draw per image (a cheap proxy of certified accuracy).

    ``x``: ``(N, C, H, W)`` with labels ``y``, or batches ``(images, labels)`` of ``batch`` images (``y`` None).
    ``progress``: a bar counting the images (``count`` of them, for batches).
    """
    from bbzo.listeners import counting

    g = torch.Generator().manual_seed(seed + 424242)
    hit = total = 0
    was = denoiser.training if denoiser is not None else False
    if denoiser is not None:
        denoiser.eval()
    n = int(x.shape[0]) if isinstance(x, torch.Tensor) else count
    with counting("noisy test accuracy", total=n, unit="img", enabled=progress) as tick:
        for xb, yb in _batches(x, y, batch):
            z = (xb + sigma * torch.randn(xb.shape, generator=g)).to(device)
            z = denoiser(z) if denoiser is not None else z
            hit += int((classify(z).argmax(1).cpu() == yb).sum())
            total += int(xb.shape[0])
            tick(int(xb.shape[0]))
    if denoiser is not None:
        denoiser.train(was)
    return round(100.0 * hit / max(1, total), 3)


@torch.no_grad()
def psnr(denoiser: nn.Module, x: Any, sigma: float, seed: int = 0, batch: int = 256, device: Any = "cpu",
         progress: bool = False, count: Optional[int] = None) -> float:
    """Mean PSNR (dB, peak 1) of ``D(x + delta)`` against ``x`` in eval mode, one fixed noise draw.

    ``x``: ``(N, C, H, W)``, or batches ``(images, labels)`` of ``batch`` images (``count`` of them, for the bar).
    """
    from bbzo.listeners import counting

    g = torch.Generator().manual_seed(seed + 424242)
    was = denoiser.training
    denoiser.eval()
    vals = []
    n = int(x.shape[0]) if isinstance(x, torch.Tensor) else count
    with counting("test PSNR", total=n, unit="img", enabled=progress) as tick:
        for xb, _ in _batches(x, None, batch):
            out = denoiser((xb + sigma * torch.randn(xb.shape, generator=g)).to(device)).cpu()
            mse = ((out - xb) ** 2).flatten(1).mean(1).clamp_min(1e-12)
            vals.append(-10.0 * torch.log10(mse))
            tick(int(xb.shape[0]))
    denoiser.train(was)
    return round(float(torch.cat(vals).mean()), 3)


def _step_schedule(opt: torch.optim.Optimizer, every: int, steps: int = 0, flag: str = "--lr-step-epochs"
                   ) -> Optional[torch.optim.lr_scheduler.LambdaLR]:
    """lr / 10 every ``every`` steps (None when 0); warns when the run of ``steps`` ends before the first drop."""
    if every <= 0:
        return None
    if 0 < steps <= every:
        import warnings

        from bbzo.errors import InefficientSettingsWarning

        warnings.warn(InefficientSettingsWarning(
            f"{flag} drops the learning rate every {every} steps, and the run has {steps}: the rate never drops. "
            f"Use {flag} 0 (a constant rate, as --preset small does) or a smaller value."), stacklevel=2)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.1 ** (step // every))


def _mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((outputs - targets) ** 2).flatten(1).mean(1)


def _test_batches(data: ImageData, s: DefenseBase, batch: int = 256) -> Batches:
    return iter_rows(data.test, data.test_rows, batch, workers=s.loader_workers, device=s.device)


def build_pretrain(s: PretrainSettings, name: str, ctx: BuildContext) -> Training:
    """MSE(D(x + delta), x) with Adam (first-order: the classifier is not involved)."""
    data: ImageData = ctx.shared["data"]
    model = make_denoiser(s).train()
    assert data.train is not None and data.train_rows is not None
    batches = NoisyBatches(data.train, None, s.batch, s.sigma, seed=s.seed, device=s.device, rows=data.train_rows,
                           workers=s.loader_workers)
    spe = batches.steps_per_epoch
    steps = s.steps or s.epochs * spe
    opt = make_optimizer(model.parameters(), "adam", lr=s.lr, weight_decay=s.weight_decay)

    def evaluate(m: nn.Module) -> dict[str, Any]:
        return {"test_psnr": psnr(m, _test_batches(data, s), s.sigma, s.seed, device=s.device,
                                  progress=ctx.run.progress, count=int(data.test_rows.numel()))}

    spec = spec_of(model)
    return Training(model=model, objective=FunctionObjective(_mse), estimator=bbzo.create_estimator("autograd"),
                    optimizer=opt, scheduler=_step_schedule(opt, int(round(s.lr_step_epochs * spe)), steps), data=batches,
                    steps=steps, evaluate=evaluate, eval_every=s.eval_every or spe, checkpoint_every=s.checkpoint_every,
                    desc="pretrain (MSE, autograd)", log_extra={"method": "mse"},
                    summary=lambda tr: {"steps_per_epoch": spe, "epochs": round(tr.step_count / spe, 3),
                                        "depth": s.depth, "width": s.width, "sigma": s.sigma, "denoiser": spec})


def budget_ratios(lpr: LayerRatios, sizes: dict[str, int], budget: int) -> LayerRatios:
    """Kept counts proportional to ``lpr.kept`` over ``sizes``' tensors, summing to ``min(budget, total size)``."""
    weight = {n: lpr.kept.get(n, 0) for n in sizes}
    if sum(weight.values()) == 0:
        weight = dict(sizes)
    total_w = sum(weight.values())
    budget = min(budget, sum(sizes.values()))
    kept = {n: min(sizes[n], int(budget * w / total_w)) for n, w in weight.items()}
    order = sorted(sizes, key=lambda n: -weight[n])
    i = 0
    while sum(kept.values()) < budget:  # hand out the remainder, largest ratio first, within each tensor's size
        n = order[i % len(order)]
        if kept[n] < sizes[n]:
            kept[n] += 1
        i += 1
    return LayerRatios(kept=kept, size=dict(sizes), sparsity=1.0 - budget / sum(sizes.values()), model=lpr.model,
                       score=lpr.score, seed=lpr.seed, queries=lpr.queries, extra={"budget": budget})


def _zo(s: FinetuneSettings, ctx: BuildContext, model: nn.Module, objective: Any, batches: NoisyBatches, last: str,
        label: str) -> tuple[Any, dict[str, Any]]:
    """DeepZero's recipe on the denoiser: ZO-GraSP ratios (``lpr.json``), a coordinate budget per step over the tuned
    layers (``last``, or every scored one), masked CGE redrawn every ``resample_every`` steps."""
    x, y = batches.get_batch(0)
    for o in objective.oracles:  # the score's rows are the training's rows
        ctx.ledger.attach(o)
    from bbzo.listeners import activity

    cached = ctx.resuming and (ctx.folder / "lpr.json").exists()
    what = f"q = {s.score_q} directions on a batch of {int(x.shape[0])}" + ("; reusing lpr.json" if cached else "")
    with activity(f"{ctx.name}: ZO-GraSP layer ratios at {s.grasp_sparsity:.0%} sparsity", enabled=ctx.run.progress,
                  what=what):
        lpr = layer_ratios("zo_grasp", model, objective, x, y, sparsity=s.grasp_sparsity, seed=s.seed,
                           ledger=ctx.ledger, include=prunable_params(model), score_options={"q": s.score_q, "mu": s.mu},
                           model_name=label, cache=ctx.folder / "lpr.json", reuse=ctx.resuming)
    tuned = [last] if s.layers == "last" else [n for n in lpr.kept]
    for n, p in model.named_parameters():
        p.requires_grad_(n in tuned)
    sizes = {n: lpr.size[n] for n in tuned}
    plan = budget_ratios(lpr, sizes, s.budget)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    every = s.resample_every or RESAMPLE_EPOCHS * batches.steps_per_epoch
    est = dynamic_sparse_cge(plan, params, mu=s.mu, resample_every=every, seed=s.seed, others="frozen")
    grasp = {n: round(f, 4) for n, f in lpr.kept_fraction.items()}
    return est, {"score_queries": lpr.queries, "grasp_kept_fraction": grasp, "tuned": tuned,
                 "coords_per_step": plan.total_kept, "resample_every": every}


def last_weight(model: nn.Module) -> str:
    """The weight of ``model``'s last Conv/Linear layer in registration order (its "last layer")."""
    names = prunable_params(model)
    return names[-1]


def _zo_for(s: FinetuneSettings, ctx: BuildContext, model: nn.Module, objective: Any, batches: NoisyBatches
            ) -> tuple[Any, dict[str, Any]]:
    """DeepZero's recipe on this denoiser: DnCNN's layout (ours, Salman's, an adapter) tunes ``dncnn``'s last conv,
    any other denoiser its last Conv/Linear weight (:func:`last_weight`)."""
    if not isinstance(getattr(model, "dncnn", None), nn.Sequential):
        return _zo(s, ctx, model, objective, batches, last_weight(model), type(model).__name__)
    spec = spec_of(model) or {}
    kw = spec.get("kwargs", {})
    if spec.get("arch") in ("dncnn", "adapter") and (kw.get("depth"), kw.get("width")) != (s.depth, s.width):
        s = dataclasses.replace(s, depth=int(kw["depth"]), width=int(kw["width"]))  # the LPR file's model label
    return _zo(s, ctx, model, objective, batches, f"dncnn.{len(model.dncnn) - 1}.weight", f"dncnn{s.depth}x{s.width}")


def build_finetune(s: FinetuneSettings, name: str, ctx: BuildContext) -> Training:
    shared = ctx.shared
    data: ImageData = shared["data"]
    model = finetuned_denoiser(s).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    oracle = make_oracle(s, name="classifier", net=shared["net"], classes=shared["class_map"])
    assert data.train is not None
    batches = NoisyBatches(data.train, shared["targets"], s.batch, s.sigma, seed=s.seed, device=s.device,
                           rows=data.train_rows, workers=s.loader_workers)
    spe = batches.steps_per_epoch
    steps = s.steps or s.epochs * spe
    loss = lambda a, o, i, t: stability_loss(a, o, i, t, output=s.output)  # noqa: E731
    objective: Any = OracleObjective(oracle, loss, needs_inputs=False)
    extra: dict[str, Any] = {"label_queries": shared["label_queries"], "denoiser": spec_of(model)}
    oracles: list[Any] = [oracle]  # fo queries it only to evaluate
    if name == "zo":
        est, more = _zo_for(s, ctx, model, objective, batches)
        extra.update(more)
    elif name == "zo-ds":
        est = bbzo.create_estimator("oracle_rge", q=s.q, mu=s.mu, seed=s.seed)
    else:  # fo: white-box gradients through the classifier (the upper reference)
        net = shared["net"]
        if not isinstance(net, nn.Module):
            raise ConfigError("fo needs a differentiable classifier module (an architecture or module:attr), not a "
                              "TorchScript file or function.")
        mean, std = oracle.mean, oracle.std

        def white_box(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(oracle.map_logits(net((outputs - mean) / std)), targets, reduction="none")
        objective, est = FunctionObjective(white_box), bbzo.create_estimator("autograd")
    opt = make_optimizer(model.parameters(), "adam", lr=float(s.method_lr.get(name, s.lr)))

    def evaluate(m: nn.Module) -> dict[str, Any]:  # in the ledger's uncharged evaluation scope
        return {"noisy_acc": noisy_accuracy(m, oracle.query, _test_batches(data, s), None, s.sigma, s.seed,
                                            device=s.device, progress=ctx.run.progress,
                                            count=int(data.test_rows.numel()))}

    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    q = est.query_cost(trainable) if est.info.zeroth_order else 0
    return Training(
        model=model, objective=objective, estimator=est, optimizer=opt, data=batches, steps=steps, oracles=oracles,
        scheduler=_step_schedule(opt, int(round(s.lr_step_epochs * spe)), steps), evaluate=evaluate,
        eval_every=s.eval_every or spe, checkpoint_every=s.checkpoint_every,
        desc=f"{name} ({q} q/step)" if q else f"{name} (white-box autograd)", log_extra={"method": name},
        trainer_kw={"update_bn_stats": False},
        summary=lambda tr: {"steps_per_epoch": spe, "epochs": round(tr.step_count / spe, 3),
                            "queries_per_step_images": q * s.batch, **extra})
