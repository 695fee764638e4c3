"""The four methods of ZO-SOL, each a :class:`~bbzo.run.Training` built for the shared run lifecycle.

The corrector ``C_theta`` sees the solver's output (u, v, Re) and adds a correction after every step:
``s_{t+1} = P(s_t) + C_theta(P(s_t))``; the loss is the mean over ``n`` unrolled steps of the squared
error (velocity normalised by its training std) to the downsampled high-fidelity reference.

* ``src``  -- the low-fidelity solver alone (nothing to train);
* ``non``  -- supervised one-step training on pre-generated pairs ``(P(ref_t), ref_{t+1})`` (the
  solver is queried once per pair to build them; no gradient through it), with the ``autograd``
  estimator on the white-box corrector;
* ``nog``  -- NOG (List, Chen, Bali, Thuerey, CMAME 433 (2025) 117441, arXiv 2402.12971): the unrolled
  loss of ZO-SOL with the gradient stopped at every solver call -- the query-only oracle steps the
  *detached* state, so the solver's output enters the next correction as a constant -- and the
  ``autograd`` estimator on the white-box corrector. No solver gradient and no query beyond the rollout
  itself (batch x unroll solver rows per step, counted by the ledger);
* ``zo``   -- ZO-SOL: Sparse-CGE through the query-only :class:`~bbzo.oracles.karman.KarmanOracle`
  (:class:`~bbzo.adapters.LoopAdapter`: K perturbed correctors x B samples per PhiFlow batch), dynamic
  sparsity at ZO-GraSP's layer-wise ratios (computed from rollout queries only);
* ``fo``   -- FO-SOL: the ``autograd`` estimator through PhiFlow's torch backend. **A white-box upper
  reference**: it differentiates the solver, which is exactly what a black box does not allow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

import bbzo
from bbzo.adapters import LoopAdapter
from bbzo.errors import ConfigError
from bbzo.models.sol_corrector import CORRECTOR_CHANNELS, Corrector
from bbzo.optim import cosine_with_warmup
from bbzo.oracles.karman import KarmanOracle, KarmanSolver, phi
from bbzo.run import BuildContext, Training
from bbzo.sparsity import sparse_cge_from_score

from .data import RolloutBatches, SolData
from .settings import SolSettings

__all__ = ["make_corrector", "load_corrector", "features", "make_rollout", "nog_rollout", "non_pairs", "PairBatches",
           "build_method", "karman_oracle", "BUILDERS"]


# ---------------------------------------------------------------------------- the corrector and the rollout
def make_corrector(s: SolSettings, data: SolData, zero_last: bool = True) -> Corrector:
    """The corrector of ``s.corrector``'s size, scaled by the training data's velocity std (seeded)."""
    std = data.velocity_std()
    re_std = float(torch.std(data.train_re.double())) if data.train_re.numel() > 1 else float(data.train_re[0])
    torch.manual_seed(s.seed)
    model = Corrector(CORRECTOR_CHANNELS[s.corrector], torch.tensor([float(std[0]), float(std[1]), re_std]), std,
                      zero_last=zero_last)
    if s.init_jitter:  # a relative perturbation of the size of float32 rounding, from its own stream
        g = torch.Generator().manual_seed(10_000 + s.seed)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + s.init_jitter * torch.randn(p.shape, generator=g))
    return model


def load_corrector(s: SolSettings, data: SolData, path: Path) -> Corrector:
    model = make_corrector(s, data)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(sd)
    except FileNotFoundError:
        raise ConfigError(f"no trained corrector at {path}; run `bbzo sol train` for this method first.") from None
    except Exception as e:
        raise ConfigError(f"{path} is not a corrector for these settings ({type(e).__name__}: {str(e)[:200]}); "
                          "retrain, or evaluate with the settings it was trained with.") from e
    return model.to(s.device)


def features(state: torch.Tensor, re: torch.Tensor) -> torch.Tensor:
    """``(N, 2, ny, nx)`` state + ``(N,)`` Re -> ``(N, 3, ny, nx)`` corrector input."""
    n, _, h, w = state.shape
    return torch.cat([state, re.to(state.dtype).view(n, 1, 1, 1).expand(n, 1, h, w)], dim=1)


def make_rollout(step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], std: torch.Tensor,
                 detach_solver: bool = False) -> Callable[[Any, Any, torch.Tensor], torch.Tensor]:
    """The SOL objective as a rollout for :class:`~bbzo.adapters.LoopAdapter` (and FO-SOL, NOG).

    ``rollout(model_fn, (state (N,2,ny,nx), re (N,)), targets (N, n, 2, ny, nx)) -> (N,)``: ``n`` solver
    steps, each followed by ``state += model_fn(features(state, re))`` (``model_fn=None``: SRC).

    ``detach_solver=True`` stops the gradient at every solver call (NOG): ``step`` receives the detached
    state, so ``P(s_t)`` is a constant and the gradient of step ``t``'s loss reaches theta only through
    the correction ``C_theta(P(s_t))`` made at that step. The loss *value* is unchanged (the same
    function of theta; only its autograd graph differs), so the same rollout is the free, stop-gradient
    surrogate of the black-box objective: one backward through the corrector, no solver gradient, no
    query beyond the rollout itself.
    """
    scale = (1.0 / std.to(torch.float32)).view(1, 2, 1, 1)

    def rollout(model_fn: Any, inputs: Any, targets: torch.Tensor) -> torch.Tensor:
        state, re = inputs
        loss = torch.zeros(state.shape[0], dtype=state.dtype, device=state.device)
        n = targets.shape[1]
        for t in range(n):
            state = step(state.detach() if detach_solver else state, re)
            if model_fn is not None:
                state = state + model_fn(features(state, re))
            loss = loss + ((state - targets[:, t]) * scale.to(state.device)).pow(2).flatten(1).mean(1)
        return loss / n

    return rollout


def nog_rollout(step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], std: torch.Tensor
                ) -> Callable[[Any, Any, torch.Tensor], torch.Tensor]:
    """NOG's rollout: :func:`make_rollout` with the gradient stopped at every solver call.

    ``step`` may be the query-only ``KarmanOracle.query`` (it refuses inputs that require grad; this
    rollout never passes one). Differentiated with autograd it gives NOG's gradient; evaluated under
    ``no_grad`` it gives exactly the ZO-SOL loss.
    """
    return make_rollout(step, std, detach_solver=True)


def _unrolled(s: SolSettings) -> str:
    """The label of the unrolled training loss (the loss plot keeps it apart from NON's one-step loss)."""
    return f"{s.unroll}-step unrolled loss"


def _adam(model: nn.Module, lr: float, schedule: str, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """Adam at ``lr``, with a cosine decay after a 5% warm-up over ``steps`` if asked."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = cosine_with_warmup(opt, max(1, steps), warmup_steps=max(1, steps) // 20) if schedule == "cosine" else None
    return opt, sched


def karman_oracle(s: SolSettings, name: str) -> KarmanOracle:
    return KarmanOracle(s.data.low, backend=s.backend, device=s.device, name=name)


def _initial_corrector(s: SolSettings, data: SolData, run_folder: Path) -> Corrector:
    """The starting corrector of the unrolled methods (ZO-SOL, NOG, FO-SOL): fresh (zero output) or the
    trained NON corrector."""
    if s.init == "non":
        path = run_folder / "non" / "corrector.pt"
        if not path.exists():
            raise ConfigError(f"init='non' fine-tunes the NON corrector, but {path} does not exist; train NON "
                              "first (`bbzo sol train --method non` with the same --out, or list non before "
                              "nog/zo/fo in --methods).")
        return load_corrector(s, data, path)
    return make_corrector(s, data).to(s.device)


# ---------------------------------------------------------------------------- ZO-SOL (and its completion)
def _sparse_cge(s: SolSettings, ctx: BuildContext, method: str) -> Training:
    """ZO-SOL's training: Sparse-CGE through the query-only solver, ZO-GraSP ratios, coordinates redrawn per
    the schedule. ``method="hybrid"``: the same estimate on the drawn coordinates, completed on every other
    coordinate by NOG's free gradient (``hybrid_cge``: the rollout's stop-gradient surrogate), same queries."""
    data: SolData = ctx.shared
    dev = torch.device(s.device)
    hybrid = method == "hybrid"
    model = _initial_corrector(s, data, ctx.run.folder)
    oracle = ctx.ledger.attach(karman_oracle(s, f"phiflow-karman({'zo-sol' if not hybrid else 'hybrid'})"))
    std = data.velocity_std().to(dev)
    rollout = make_rollout(oracle.query, std)
    objective = bbzo.Rollout(rollout, surrogate=nog_rollout(oracle.query, std)) if hybrid else rollout
    batches = RolloutBatches(data.train, data.train_re, s.unroll, s.batch, seed=s.seed, device=dev)
    (x, re), y = batches.get_batch(0)
    # Pruning-at-init scores are theta-weighted: on the zero last layer of a fresh corrector they are all 0, that
    # layer would keep no coordinate and the corrector could never leave zero. Score the network at its standard
    # init instead (the architecture's layer-wise importance, as DeepZero).
    scored = make_corrector(s, data, zero_last=False).to(dev) if s.init == "scratch" and not ctx.resuming else model
    est, lpr = sparse_cge_from_score(
        s.score, model, rollout, (x, re), y, sparsity=s.sparsity, mu=s.mu, resample_every=s.resample_every,
        seed=s.seed, others="dense", scored_model=scored, ledger=ctx.ledger, surrogate=hybrid,
        include=[n for n, _ in model.named_parameters() if n.endswith("weight")], score_options={"q": s.score_q},
        adapter_factory=lambda m: LoopAdapter(m, sets_per_call=s.sets_per_call),
        model_name="sol-corrector-" + s.corrector, cache=ctx.folder / "lpr.json", reuse=ctx.resuming)
    sampler_coords = est.query_cost({n: p.detach() for n, p in model.named_parameters()}) - 1
    score_queries = lpr.queries
    opt, sched = _adam(model, (s.hybrid_lr or s.lr) if hybrid else s.lr, s.schedule, s.steps)
    desc = f"ZO-SOL + NOG ({sampler_coords + 1} q/step)" if hybrid else f"ZO-SOL ({sampler_coords + 1} q/step)"
    return Training(
        model=model, objective=objective, estimator=est, optimizer=opt, scheduler=sched,
        data=batches, steps=s.steps, adapter=LoopAdapter(model, sets_per_call=s.sets_per_call), oracles=[oracle],
        checkpoint_every=s.checkpoint_every, weights="corrector.pt",
        desc=desc, log_extra={"method": method, "objective": _unrolled(s)},
        summary=lambda tr: {"score_queries": score_queries})


def build_zo(s: SolSettings, ctx: BuildContext) -> Training:
    """ZO-SOL: Sparse-CGE through the query-only solver (DeepZero)."""
    return _sparse_cge(s, ctx, "zo")


def build_hybrid(s: SolSettings, ctx: BuildContext) -> Training:
    """ZO-SOL completed by NOG: ``hybrid_cge`` (finite differences on the drawn coordinates, the stop-gradient
    gradient on all others), ZO-SOL's queries, ratios, draws, schedule; learning rate ``hybrid_lr`` (default ``lr``)."""
    return _sparse_cge(s, ctx, "hybrid")


# ---------------------------------------------------------------------------- NOG
def build_nog(s: SolSettings, ctx: BuildContext) -> Training:
    """NOG: the unrolled loss with the solver's outputs as constants, autograd on the corrector only.

    The oracle is the query-only black box (counted by the training's ledger: ``batch x unroll`` rows per
    step, the rollout itself); the estimator charges no query. Same batches (seed), optimizer, schedule
    and start as ZO-SOL; learning rate ``nog_lr`` (default ``lr``).
    """
    data: SolData = ctx.shared
    dev = torch.device(s.device)
    model = _initial_corrector(s, data, ctx.run.folder)
    oracle = ctx.ledger.attach(karman_oracle(s, "phiflow-karman(nog)"))
    rollout = nog_rollout(oracle.query, data.velocity_std().to(dev))
    batches = RolloutBatches(data.train, data.train_re, s.unroll, s.batch, seed=s.seed, device=dev)
    opt, sched = _adam(model, s.nog_lr or s.lr, s.schedule, s.steps)
    return Training(
        model=model, objective=rollout, estimator=bbzo.create_estimator("autograd"), optimizer=opt, scheduler=sched,
        data=batches, steps=s.steps, adapter=LoopAdapter(model), oracles=[oracle], checkpoint_every=s.checkpoint_every,
        weights="corrector.pt", desc="NOG", log_extra={"method": "nog", "objective": _unrolled(s)})


# ---------------------------------------------------------------------------- FO-SOL
def build_fo(s: SolSettings, ctx: BuildContext) -> Training:
    """FO-SOL (white-box reference): autograd through PhiFlow's torch backend."""
    data: SolData = ctx.shared
    dev = torch.device(s.device)
    model = _initial_corrector(s, data, ctx.run.folder)
    solver = KarmanSolver(s.data.low, backend="torch", jit=False, device=dev)  # differentiable, on purpose
    rollout = make_rollout(solver.step, data.velocity_std().to(dev))
    batches = RolloutBatches(data.train, data.train_re, s.unroll, s.batch, seed=s.seed, device=dev)
    # PhiML builds the adjoint solve's tensors during backward: keep them on the torch backend
    est = bbzo.create_estimator("autograd", context=lambda: phi().TORCH)
    opt, sched = _adam(model, s.fo_lr or s.lr, s.schedule, s.steps)
    return Training(
        model=model, objective=rollout, estimator=est, optimizer=opt, scheduler=sched, data=batches, steps=s.steps,
        adapter=LoopAdapter(model), checkpoint_every=s.checkpoint_every, weights="corrector.pt", desc="FO-SOL",
        log_extra={"method": "fo", "objective": _unrolled(s)}, summary=lambda tr: {"solver_state_steps": tr.step_count * s.batch * s.unroll})


# ---------------------------------------------------------------------------- NON
def non_pairs(s: SolSettings, data: SolData, oracle: Optional[KarmanOracle] = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(P(ref_t) (M,2,ny,nx), re (M,), ref_{t+1} (M,2,ny,nx), oracle rows)`` for every training pair."""
    oracle = oracle or karman_oracle(s, "phiflow-karman(non-pairs)")
    r, t = data.train.shape[:2]
    src = data.train[:, :-1].reshape(-1, *data.train.shape[2:])
    tgt = data.train[:, 1:].reshape(-1, *data.train.shape[2:])
    re = data.train_re.repeat_interleave(t - 1).float()
    rows_before = oracle.rows_used
    out = torch.cat([oracle.query(src[i:i + 256], re[i:i + 256]) for i in range(0, src.shape[0], 256)])
    return out, re, tgt, oracle.rows_used - rows_before


class PairBatches:
    """NON's minibatches: ``B`` pairs drawn with replacement, a pure function of ``(seed, step)``.

    ``get_batch(step)`` -> ``(features(P(ref_t), re) (B, 3, ny, nx), (P(ref_t), ref_{t+1}))``.
    """

    def __init__(self, p: torch.Tensor, re: torch.Tensor, tgt: torch.Tensor, batch: int, seed: int) -> None:
        self.p, self.re, self.tgt, self.seed = p, re, tgt, seed
        self.batch = min(batch, p.shape[0])

    def get_batch(self, step: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 7919 + step)
        idx = torch.randint(0, self.p.shape[0], (self.batch,), generator=g).to(self.p.device)
        return features(self.p[idx], self.re[idx]), (self.p[idx], self.tgt[idx])


def build_non(s: SolSettings, ctx: BuildContext) -> Training:
    """NON: supervised one-step correction on pre-generated pairs (no gradient through the solver)."""
    data: SolData = ctx.shared
    dev = torch.device(s.device)
    model = make_corrector(s, data).to(dev)
    oracle = ctx.ledger.attach(karman_oracle(s, "phiflow-karman(non-pairs)"))
    p, re, tgt, _ = non_pairs(s, data, oracle)
    p, re, tgt = p.to(dev), re.to(dev), tgt.to(dev)
    scale = (1.0 / data.velocity_std().to(dev)).view(1, 2, 1, 1)

    def one_step_loss(correction: torch.Tensor, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        start, target = pair
        return ((start + correction - target) * scale).pow(2).flatten(1).mean(1)

    opt, sched = _adam(model, s.non_lr, s.non_schedule, s.non_steps)
    return Training(
        model=model, objective=one_step_loss, estimator=bbzo.create_estimator("autograd"), optimizer=opt,
        scheduler=sched, data=PairBatches(p, re, tgt, s.non_batch, s.seed), steps=s.non_steps, oracles=[oracle], checkpoint_every=s.checkpoint_every, weights="corrector.pt", desc="NON",
        log_extra={"method": "non", "objective": "one-step loss on pairs"})


#: The builder of every trainable method (``src`` trains nothing).
BUILDERS: dict[str, Callable[[SolSettings, BuildContext], Training]] = {
    "non": build_non, "nog": build_nog, "zo": build_zo, "hybrid": build_hybrid, "fo": build_fo,
}


def build_method(s: SolSettings, method: str, ctx: BuildContext) -> Optional[Training]:
    """The training of ``method`` (``src``: None, nothing to train)."""
    if method == "src":
        return None
    return BUILDERS[method](s, ctx)
