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

The denoiser's BatchNorm stays in eval mode while fine-tuning (frozen statistics, so cached features and
every query of a step see the same network).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

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

from .data import CifarData, NoisyBatches
from .settings import DefenseBase, FinetuneSettings, PretrainSettings

__all__ = ["make_oracle", "make_denoiser", "load_denoiser", "stability_targets", "noisy_accuracy", "psnr",
           "build_pretrain", "build_finetune", "budget_ratios", "RESAMPLE_EPOCHS"]

RESAMPLE_EPOCHS = 5  # DeepZero's --mask-shuffle-interval


def make_oracle(s: DefenseBase, name: str = "classifier", net: Any = None) -> ClassifierOracle:
    """The query-only classifier of the settings (``net``: reuse an already loaded one)."""
    net = net if net is not None else load_classifier(s.classifier, s.weights, s.num_classes)
    return ClassifierOracle(net, mean=s.mean, std=s.std, output=s.output, max_batch=s.max_batch, name=name).to(s.device)


def make_denoiser(s: DefenseBase) -> DnCNN:
    torch.manual_seed(s.seed)
    return DnCNN(s.depth, s.width).to(s.device)


def load_denoiser(s: DefenseBase, path: Optional[Path]) -> DnCNN:
    """A DnCNN of the settings' depth and width with the weights of ``path`` (a state dict)."""
    if path is None:
        raise ConfigError("no denoiser given: pass --denoiser runs/.../model.pt (train one with `bbzo defense pretrain`).")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"denoiser {path} does not exist; train one with `bbzo defense pretrain`.")
    model = make_denoiser(s)
    try:
        state = torch.load(path, map_location=s.device, weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    except Exception as e:  # noqa: BLE001 - corrupt, truncated, or another depth/width
        raise ConfigError(f"{path} is not a DnCNN(depth={s.depth}, width={s.width}) state dict ({type(e).__name__}: "
                          f"{str(e)[:200]}); check --depth/--width or retrain it.") from e
    return model


@torch.no_grad()
def stability_targets(oracle: ClassifierOracle, images: torch.Tensor, device: Any = "cpu", batch: int = 512
                      ) -> torch.Tensor:
    """``argmax f(x)`` of the clean images ``(N,)`` (one query per image, charged to the oracle's ledger)."""
    return torch.cat([oracle.query(images[i:i + batch].to(device)).argmax(1).cpu()
                      for i in range(0, images.shape[0], batch)])


def stability_loss(answers: torch.Tensor, outputs: Any, inputs: Any, targets: torch.Tensor, *, output: str = "logits"
                   ) -> torch.Tensor:
    """Per-sample CE ``(N,)`` of the black box's answers against ``argmax f(x)``."""
    return F.nll_loss(log_probs(answers, output), targets, reduction="none")


@torch.no_grad()
def noisy_accuracy(denoiser: Optional[nn.Module], classify: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                   y: torch.Tensor, sigma: float, seed: int = 0, batch: int = 256, device: Any = "cpu") -> float:
    """Top-1 accuracy (%) of ``f(D(x + delta))`` with one fixed noise draw per image (a cheap proxy of certified accuracy)."""
    g = torch.Generator().manual_seed(seed + 424242)
    hit = 0
    was = denoiser.training if denoiser is not None else False
    if denoiser is not None:
        denoiser.eval()
    for i in range(0, x.shape[0], batch):
        xb = x[i:i + batch]
        z = (xb + sigma * torch.randn(xb.shape, generator=g)).to(device)
        z = denoiser(z) if denoiser is not None else z
        hit += int((classify(z).argmax(1).cpu() == y[i:i + batch]).sum())
    if denoiser is not None:
        denoiser.train(was)
    return round(100.0 * hit / max(1, x.shape[0]), 3)


@torch.no_grad()
def psnr(denoiser: nn.Module, x: torch.Tensor, sigma: float, seed: int = 0, batch: int = 256, device: Any = "cpu") -> float:
    """Mean PSNR (dB, peak 1) of ``D(x + delta)`` against ``x`` in eval mode, one fixed noise draw."""
    g = torch.Generator().manual_seed(seed + 424242)
    was = denoiser.training
    denoiser.eval()
    vals = []
    for i in range(0, x.shape[0], batch):
        xb = x[i:i + batch]
        out = denoiser((xb + sigma * torch.randn(xb.shape, generator=g)).to(device)).cpu()
        mse = ((out - xb) ** 2).flatten(1).mean(1).clamp_min(1e-12)
        vals.append(-10.0 * torch.log10(mse))
    denoiser.train(was)
    return round(float(torch.cat(vals).mean()), 3)


def _step_schedule(opt: torch.optim.Optimizer, every: int) -> Optional[torch.optim.lr_scheduler.LambdaLR]:
    if every <= 0:
        return None
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.1 ** (step // every))


def _mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((outputs - targets) ** 2).flatten(1).mean(1)


def build_pretrain(s: PretrainSettings, name: str, ctx: BuildContext) -> Training:
    """MSE(D(x + delta), x) with Adam (first-order: the classifier is not involved)."""
    data: CifarData = ctx.shared
    model = make_denoiser(s).train()
    batches = NoisyBatches(data.train_x, None, s.batch, s.sigma, seed=s.seed, device=s.device)
    spe = batches.steps_per_epoch
    steps = s.steps or s.epochs * spe
    opt = make_optimizer(model.parameters(), "adam", lr=s.lr, weight_decay=s.weight_decay)
    test_x = data.test_x

    def evaluate(m: nn.Module) -> dict[str, Any]:
        return {"test_psnr": psnr(m, test_x, s.sigma, s.seed, device=s.device)}

    return Training(model=model, objective=FunctionObjective(_mse), estimator=bbzo.create_estimator("autograd"),
                    optimizer=opt, scheduler=_step_schedule(opt, int(round(s.lr_step_epochs * spe))), data=batches,
                    steps=steps, evaluate=evaluate, eval_every=s.eval_every or spe, checkpoint_every=s.checkpoint_every,
                    desc="pretrain (MSE, autograd)", log_extra={"method": "mse"},
                    summary=lambda tr: {"steps_per_epoch": spe, "epochs": round(tr.step_count / spe, 3),
                                        "depth": s.depth, "width": s.width, "sigma": s.sigma})


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


def _zo(s: FinetuneSettings, ctx: BuildContext, model: DnCNN, objective: Any, batches: NoisyBatches
        ) -> tuple[Any, dict[str, Any]]:
    x, y = batches.get_batch(0)
    for o in objective.oracles:  # the score's rows are the training's rows
        ctx.ledger.attach(o)
    lpr = layer_ratios("zo_grasp", model, objective, x, y, sparsity=s.grasp_sparsity, seed=s.seed, ledger=ctx.ledger,
                       include=prunable_params(model), score_options={"q": s.score_q, "mu": s.mu},
                       model_name=f"dncnn{s.depth}x{s.width}", cache=ctx.folder / "lpr.json", reuse=ctx.resuming)
    last = f"dncnn.{len(model.dncnn) - 1}.weight"
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


def build_finetune(s: FinetuneSettings, name: str, ctx: BuildContext) -> Training:
    shared = ctx.shared
    data: CifarData = shared["data"]
    model = load_denoiser(s, s.denoiser).eval()
    oracle = make_oracle(s, name="classifier", net=shared["net"])
    batches = NoisyBatches(data.train_x, shared["targets"], s.batch, s.sigma, seed=s.seed, device=s.device)
    spe = batches.steps_per_epoch
    steps = s.steps or s.epochs * spe
    loss = lambda a, o, i, t: stability_loss(a, o, i, t, output=s.output)  # noqa: E731
    objective: Any = OracleObjective(oracle, loss, needs_inputs=False)
    extra: dict[str, Any] = {"label_queries": shared["label_queries"]}
    oracles: list[Any] = [oracle]  # fo queries it only to evaluate
    if name == "zo":
        est, more = _zo(s, ctx, model, objective, batches)
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
            return F.cross_entropy(net((outputs - mean) / std), targets, reduction="none")
        objective, est = FunctionObjective(white_box), bbzo.create_estimator("autograd")
    opt = make_optimizer(model.parameters(), "adam", lr=float(s.method_lr.get(name, s.lr)))
    test_x, test_y = data.test_x, data.test_y

    def evaluate(m: nn.Module) -> dict[str, Any]:  # in the ledger's uncharged evaluation scope
        return {"noisy_acc": noisy_accuracy(m, oracle.query, test_x, test_y, s.sigma, s.seed, device=s.device)}

    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    q = est.query_cost(trainable) if est.info.zeroth_order else 0
    return Training(
        model=model, objective=objective, estimator=est, optimizer=opt, data=batches, steps=steps, oracles=oracles,
        scheduler=_step_schedule(opt, int(round(s.lr_step_epochs * spe))), evaluate=evaluate,
        eval_every=s.eval_every or spe, checkpoint_every=s.checkpoint_every,
        desc=f"{name} ({q} q/step)" if q else f"{name} (white-box autograd)", log_extra={"method": name},
        trainer_kw={"update_bn_stats": False},
        summary=lambda tr: {"steps_per_epoch": spe, "epochs": round(tr.step_count / spe, 3),
                            "queries_per_step_images": q * s.batch, **extra})
