"""ZO-SOL: train a PDE corrector *through* a non-differentiable PhiFlow solver (DeepZero §6.2, App. H).

The corrector ``C_theta`` sees the solver's output (u, v, Re) and adds a correction after every step:
``s_{t+1} = P(s_t) + C_theta(P(s_t))``; the loss is the mean over ``n`` unrolled steps of the squared
error (velocity normalised by its training std) to the downsampled high-fidelity reference.

Methods, all on the same data and the same evaluation:

* ``src``  -- the low-fidelity solver alone (no correction);
* ``non``  -- supervised one-step training on pre-generated pairs ``(P(ref_t), ref_{t+1})`` (the
  solver is queried once per pair to build them; no gradient through it);
* ``zo``   -- ZO-SOL: bbzo's trainer with Sparse-CGE through the query-only :class:`KarmanOracle`
  (:class:`~bbzo.adapters.LoopAdapter`: K perturbed correctors x B samples per PhiFlow batch),
  dynamic sparsity at ZO-GraSP's layer-wise ratios (computed from rollout queries only);
* ``fo``   -- FO-SOL: autograd through PhiFlow's torch backend. **A white-box upper reference**: it
  differentiates the solver, which is exactly what a black box does not allow.

Evaluation: every test Re rolled out from the reference's first recorded frame for ``eval_steps``
steps; MAE = mean |Δ| of (u, v) over the NCHW faces and all steps, per Re and overall.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

import bbzo
from bbzo.adapters import LoopAdapter
from bbzo.checkpoint import atomic_write_bytes, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from bbzo.errors import ConfigError
from bbzo.logging import JSONLLogger, ProgressBar, save_figure
from bbzo.oracles.karman import KarmanOracle, KarmanSolver, phi
from bbzo.sparsity import DynamicSparsity, LayerRatios, compute_score, ratios_from_scores
from bbzo.trainer import Trainer

from .sol_data import DataSettings, RolloutBatches, SolData, generate, load

__all__ = ["SolConfig", "PRESETS", "Corrector", "make_corrector", "make_rollout", "features", "METHODS",
           "train_method", "evaluate", "evaluate_run", "run_sol", "results_table"]

METHODS = ("src", "non", "zo", "fo")
METHOD_NAMES = {"src": "SRC", "non": "NON", "zo": "ZO-SOL", "fo": "FO-SOL (white-box)"}
CORRECTORS = {"mercury": (32, 64), "small": (16, 16), "tiny": (8, 8)}


@dataclass
class SolConfig:
    """One ZO-SOL experiment. ``PRESETS`` holds the demo, the CPU benchmark and the paper settings."""

    data: DataSettings = field(default_factory=DataSettings)
    corrector: str = "mercury"
    unroll: int = 16
    batch: int = 3
    steps: int = 1000
    lr: float = 1e-4
    # ZO-SOL
    sparsity: float = 0.95
    score: str = "zo_grasp"
    score_q: int = 192
    resample_every: int = 1
    mu: float = 1e-4  # forward differences; DeepZero's 5e-3 is curvature-biased here (see README)
    sets_per_call: int = 32
    # NON
    non_steps: int = 1000
    non_batch: int = 32
    non_lr: float = 1e-3
    # all
    fo_lr: Optional[float] = None  # default: lr
    init: str = "scratch"  # ZO-SOL / FO-SOL start: "scratch" (paper) or "non" (fine-tune the NON corrector)
    eval_steps: int = 0  # 0: every recorded frame
    backend: str = "torch"
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            d = dict(self.data)
            for k in ("train_re", "test_re"):
                if k in d:
                    d[k] = tuple(float(x) for x in d[k])
            self.data = DataSettings(**d)
        if self.corrector not in CORRECTORS:
            raise ConfigError(f"corrector must be one of {', '.join(CORRECTORS)}, got {self.corrector!r}.")
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}.")
        if self.init not in ("scratch", "non"):
            raise ConfigError(f"init must be 'scratch' or 'non', got {self.init!r}.")
        if self.unroll < 1 or self.batch < 1 or self.steps < 0:
            raise ConfigError("unroll and batch must be >= 1 and steps >= 0.")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["data"] = {**d["data"], "train_re": list(self.data.train_re), "test_re": list(self.data.test_re)}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SolConfig":
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ConfigError(f"unknown SOL settings {bad}; known: {sorted(known)}.")
        return cls(**d)


PRESETS: dict[str, dict[str, Any]] = {
    # `make demo`: about six minutes on a 2-core CPU, data generated on the spot (2 held-out Re)
    "demo": dict(data=dict(train_re=(195.3, 781.3, 3125.0), test_re=(390.6, 1562.5), warmup=300, frames=60),
                 corrector="tiny", unroll=4, batch=1, steps=100, lr=1e-3, sets_per_call=32, score_q=24,
                 non_steps=400, non_lr=1e-3, checkpoint_every=10),
    # benchmarks/sol_small.json: all of the paper's Re, 100-frame rollouts, the tiny corrector
    "small": dict(data=dict(warmup=400, frames=100), corrector="tiny", unroll=4, batch=1, steps=300, lr=1e-3,
                  sets_per_call=32, score_q=48, non_steps=600, non_lr=1e-3, checkpoint_every=20),
    # Appendix H for a GPU machine: 64x128 reference, 1000 warm-up + 500 frames, mercury, n=16, Adam 1e-4
    # (steps = 10 epochs of 6 sims x 484 start frames / batch 3)
    "paper": dict(data=dict(warmup=1000, frames=500), corrector="mercury", unroll=16, batch=3, steps=9680,
                  lr=1e-4, sets_per_call=64, score_q=192, non_steps=9680, non_lr=1e-4, checkpoint_every=50),
}


def preset(name: str, **overrides: Any) -> SolConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}.")
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[name].items()}
    data = d.pop("data", {})
    data.update(overrides.pop("data", {}) or {})
    d.update(overrides)
    return SolConfig(data=DataSettings(**data), **d)


# ---------------------------------------------------------------------------- the corrector
class Corrector(nn.Module):
    """5x5 conv net ``(u, v, Re) -> (du, dv)``: input divided by ``in_scale``, output times ``out_scale``.

    ``channels=(32, 64)`` is the paper's network (3 -> 32 -> 64 -> 2, 56,898 parameters); ``(16, 16)``
    (8,434) and ``(8, 8)`` (2,618) are CPU-sized. The last layer starts at zero, so training starts
    from "no correction" (exactly SRC) instead of from a random correction that first has to be
    unlearned (measured: a default-initialised 1k-parameter corrector starts 50x worse than SRC).
    """

    def __init__(self, channels: tuple[int, ...], in_scale: torch.Tensor, out_scale: torch.Tensor,
                 kernel: int = 5, zero_last: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for h in channels:
            layers += [nn.Conv2d(c, h, kernel, padding=kernel // 2), nn.ReLU()]
            c = h
        layers.append(nn.Conv2d(c, 2, kernel, padding=kernel // 2))
        self.net = nn.Sequential(*layers)
        if zero_last:
            with torch.no_grad():
                layers[-1].weight.zero_()
                layers[-1].bias.zero_()
        self.register_buffer("in_scale", torch.as_tensor(in_scale, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("out_scale", torch.as_tensor(out_scale, dtype=torch.float32).view(1, 2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(N, 3, ny, nx)`` raw (u, v, Re); returns ``(N, 2, ny, nx)`` correction in velocity units."""
        return self.net(x / self.in_scale) * self.out_scale


def make_corrector(cfg: SolConfig, data: SolData, zero_last: bool = True) -> Corrector:
    std = data.velocity_std()
    re_std = float(torch.std(data.train_re.double())) if data.train_re.numel() > 1 else float(data.train_re[0])
    torch.manual_seed(cfg.seed)
    return Corrector(CORRECTORS[cfg.corrector], torch.tensor([float(std[0]), float(std[1]), re_std]), std,
                     zero_last=zero_last)


def features(state: torch.Tensor, re: torch.Tensor) -> torch.Tensor:
    """``(N, 2, ny, nx)`` state + ``(N,)`` Re -> ``(N, 3, ny, nx)`` corrector input."""
    n, _, h, w = state.shape
    return torch.cat([state, re.to(state.dtype).view(n, 1, 1, 1).expand(n, 1, h, w)], dim=1)


def make_rollout(step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], std: torch.Tensor
                 ) -> Callable[[Any, Any, torch.Tensor], torch.Tensor]:
    """The SOL objective as a rollout for :class:`~bbzo.adapters.LoopAdapter` (and FO-SOL).

    ``rollout(model_fn, (state (N,2,ny,nx), re (N,)), targets (N, n, 2, ny, nx)) -> (N,)``: ``n`` solver
    steps, each followed by ``state += model_fn(features(state, re))`` (``model_fn=None``: SRC).
    """
    scale = (1.0 / std.to(torch.float32)).view(1, 2, 1, 1)

    def rollout(model_fn: Any, inputs: Any, targets: torch.Tensor) -> torch.Tensor:
        state, re = inputs
        loss = torch.zeros(state.shape[0], dtype=state.dtype, device=state.device)
        n = targets.shape[1]
        for t in range(n):
            state = step(state, re)
            if model_fn is not None:
                state = state + model_fn(features(state, re))
            loss = loss + ((state - targets[:, t]) * scale.to(state.device)).pow(2).flatten(1).mean(1)
        return loss / n

    return rollout


# ---------------------------------------------------------------------------- training
def _oracle(cfg: SolConfig, name: str) -> KarmanOracle:
    return KarmanOracle(cfg.data.low, backend=cfg.backend, device=cfg.device, name=name)


def _save_weights(model: nn.Module, path: Path) -> None:
    atomic_write_bytes(path, lambda f: torch.save(model.state_dict(), f))


def load_corrector(cfg: SolConfig, data: SolData, path: Path) -> Corrector:
    model = make_corrector(cfg, data)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(sd)
    except FileNotFoundError:
        raise ConfigError(f"no trained corrector at {path}; run `bbzo sol train` for this method first.") from None
    except Exception as e:
        raise ConfigError(f"{path} is not a corrector for these settings ({type(e).__name__}: {str(e)[:200]}); "
                          "retrain, or evaluate with the settings it was trained with.") from e
    return model.to(cfg.device)


def _initial_corrector(cfg: SolConfig, data: SolData, run: Path) -> Corrector:
    """The starting corrector of ZO-SOL / FO-SOL: fresh (zero output) or the trained NON corrector."""
    if cfg.init == "non":
        path = run.parent / "non" / "corrector.pt"
        if not path.exists():
            raise ConfigError(f"init='non' fine-tunes the NON corrector, but {path} does not exist; train NON "
                              "first (`bbzo sol train --method non` with the same --out, or list non before "
                              "zo/fo in --methods).")
        return load_corrector(cfg, data, path)
    return make_corrector(cfg, data).to(cfg.device)


def train_zo(cfg: SolConfig, data: SolData, run: Path, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """ZO-SOL: Sparse-CGE through the query-only solver, ZO-GraSP ratios, dynamic sparsity."""
    t0 = time.perf_counter()
    dev = torch.device(cfg.device)
    model = _initial_corrector(cfg, data, run)
    oracle = _oracle(cfg, "phiflow-karman(zo-sol)")
    rollout = make_rollout(oracle.query, data.velocity_std().to(dev))
    batches = RolloutBatches(data.train, data.train_re, cfg.unroll, cfg.batch, seed=cfg.seed, device=dev)
    params = {n: p.detach() for n, p in model.named_parameters()}
    lpr_path = run / "lpr.json"
    if lpr_path.exists() and resume:
        lpr = LayerRatios.load(lpr_path)
        score_queries = lpr.queries
    else:
        (x, re), y = batches.get_batch(0)
        names = [n for n in params if n.endswith("weight")]
        # Pruning-at-init scores are theta-weighted: on the zero last layer of a fresh corrector they are
        # all 0, that layer would keep no coordinate and the corrector could never leave zero. Score the
        # network at its standard init instead (the architecture's layer-wise importance, as DeepZero).
        scored = make_corrector(cfg, data, zero_last=False).to(dev) if cfg.init == "scratch" else model
        res = compute_score(cfg.score, scored, rollout, (x, re), y, include=names, seed=cfg.seed, q=cfg.score_q,
                            adapter_factory=lambda m: LoopAdapter(m, sets_per_call=cfg.sets_per_call))
        lpr = ratios_from_scores(res.scores, cfg.sparsity, keep=res.keep, model="sol-corrector-" + cfg.corrector,
                                 score=cfg.score, seed=cfg.seed, queries=res.queries)
        lpr.save(lpr_path)
        score_queries = res.queries
    est = bbzo.create_estimator("sparse_cge", mu=cfg.mu)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    trainer = Trainer(model, rollout, est, opt, batches, max_steps=cfg.steps, oracle=oracle, run_dir=run,
                      checkpoint_every=cfg.checkpoint_every, adapter=LoopAdapter(model, sets_per_call=cfg.sets_per_call))
    sparsity = DynamicSparsity(lpr, params, resample_every=cfg.resample_every, seed=cfg.seed, others="dense").attach(trainer)
    log = JSONLLogger(run / "metrics.jsonl", extra={"method": "zo"})
    if not (resume and trainer.checkpoint_path.exists()) and log.path.exists():
        log.path.unlink()
    log.attach(trainer)
    bar = ProgressBar(desc=f"ZO-SOL ({sparsity.coords_per_step + 1} q/step)", disable=not progress).attach(trainer)
    if resume and trainer.checkpoint_path.exists():
        trainer.resume()
    trainer.run()
    bar.close()
    _save_weights(model, run / "corrector.pt")
    return {"method": "zo", "steps": trainer.step_count, "queries": trainer.queries_used + score_queries,
            "score_queries": score_queries, "queries_per_step": sparsity.coords_per_step + 1,
            "oracle_rows": oracle.rows_used, "wall_s": round(time.perf_counter() - t0, 1),
            "final_train_loss": trainer.status.get("loss")}


def _fo_loop(name: str, model: nn.Module, loss_of_batch: Callable[[int], torch.Tensor], steps: int, lr: float,
             run: Path, cfg: SolConfig, *, resume: bool, progress: bool,
             backward_ctx: Callable[[], Any] = contextlib.nullcontext) -> dict[str, Any]:
    """A plain first-order loop with atomic checkpoints and exact resume (NON and FO-SOL)."""
    from tqdm.auto import tqdm

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ckpt = run / "checkpoint.pt"
    log = JSONLLogger(run / "metrics.jsonl", extra={"method": name})
    step = 0
    if resume and ckpt.exists():
        sd = load_checkpoint(ckpt)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optimizer"])
        restore_rng(sd["rng"])
        step = int(sd["step"])
        log.truncate(step)
    elif log.path.exists():
        log.path.unlink()

    def save() -> None:
        save_checkpoint(ckpt, {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                               "rng": capture_rng()})

    t0 = time.perf_counter()
    bar = tqdm(total=steps, initial=step, desc=name, disable=not progress, leave=False)
    loss = float("nan")
    while step < steps:
        ts = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        l = loss_of_batch(step)
        if not torch.isfinite(l):
            save()
            raise ConfigError(f"{name}: loss is NaN/inf at step {step + 1}; lower the learning rate.")
        with backward_ctx():
            l.backward()
        opt.step()
        step += 1
        loss = float(l.detach())
        log(None, {"step": step, "loss": loss, "step_time": time.perf_counter() - ts})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4g}")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save()
    bar.close()
    save()
    _save_weights(model, run / "corrector.pt")
    return {"steps": step, "wall_s": round(time.perf_counter() - t0, 1), "final_train_loss": loss}


def train_fo(cfg: SolConfig, data: SolData, run: Path, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """FO-SOL (white-box reference): autograd through PhiFlow's torch backend."""
    dev = torch.device(cfg.device)
    model = _initial_corrector(cfg, data, run)
    solver = KarmanSolver(cfg.data.low, backend="torch", jit=False, device=dev)  # differentiable, on purpose
    rollout = make_rollout(solver.step, data.velocity_std().to(dev))
    batches = RolloutBatches(data.train, data.train_re, cfg.unroll, cfg.batch, seed=cfg.seed, device=dev)

    def loss_of(step: int) -> torch.Tensor:
        inputs, y = batches.get_batch(step)
        return rollout(model, inputs, y).mean()

    # PhiML builds the adjoint solve's tensors during backward: keep them on the torch backend
    res = _fo_loop("FO-SOL", model, loss_of, cfg.steps, cfg.fo_lr or cfg.lr, run, cfg, resume=resume,
                   progress=progress, backward_ctx=lambda: phi().TORCH)
    return {"method": "fo", **res, "solver_state_steps": res["steps"] * cfg.batch * cfg.unroll}


def non_pairs(cfg: SolConfig, data: SolData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(P(ref_t) (M,2,ny,nx), re (M,), ref_{t+1} (M,2,ny,nx), oracle rows)`` for every training pair."""
    oracle = _oracle(cfg, "phiflow-karman(non-pairs)")
    r, t = data.train.shape[:2]
    src = data.train[:, :-1].reshape(-1, *data.train.shape[2:])
    tgt = data.train[:, 1:].reshape(-1, *data.train.shape[2:])
    re = data.train_re.repeat_interleave(t - 1).float()
    out = torch.cat([oracle.query(src[i:i + 256], re[i:i + 256]) for i in range(0, src.shape[0], 256)])
    return out, re, tgt, oracle.rows_used


def train_non(cfg: SolConfig, data: SolData, run: Path, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """NON: supervised one-step correction on pre-generated pairs (no gradient through the solver)."""
    t0 = time.perf_counter()
    dev = torch.device(cfg.device)
    model = make_corrector(cfg, data).to(dev)
    p, re, tgt, rows = non_pairs(cfg, data)
    p, re, tgt = p.to(dev), re.to(dev), tgt.to(dev)
    scale = (1.0 / data.velocity_std().to(dev)).view(1, 2, 1, 1)
    m = p.shape[0]
    bs = min(cfg.non_batch, m)

    def loss_of(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        idx = torch.randint(0, m, (bs,), generator=g).to(dev)
        pred = p[idx] + model(features(p[idx], re[idx]))
        return ((pred - tgt[idx]) * scale).pow(2).flatten(1).mean(1).mean()

    res = _fo_loop("NON", model, loss_of, cfg.non_steps, cfg.non_lr, run, cfg, resume=resume, progress=progress)
    res["wall_s"] = round(time.perf_counter() - t0, 1)  # including the solver queries for the pairs
    return {"method": "non", **res, "oracle_rows": rows}


def train_method(method: str, cfg: SolConfig, data: SolData, out: Path, **kw: Any) -> dict[str, Any]:
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}.")
    if method == "src":
        return {"method": "src", "steps": 0}
    run = out / method
    run.mkdir(parents=True, exist_ok=True)
    fn = {"zo": train_zo, "fo": train_fo, "non": train_non}[method]
    res = fn(cfg, data, run, **kw)
    (run / "train.json").write_text(json.dumps(res, indent=1))
    return res


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(cfg: SolConfig, data: SolData, corrector: Optional[nn.Module], *, keep_states: bool = False
             ) -> dict[str, Any]:
    """Roll every test Re out from the first reference frame; MAE per Re, per step and overall."""
    dev = torch.device(cfg.device)
    oracle = _oracle(cfg, "phiflow-karman(eval)")
    ref = data.test.to(dev)
    steps = min(cfg.eval_steps or ref.shape[1] - 1, ref.shape[1] - 1)
    state, re = ref[:, 0].clone(), data.test_re.to(dev).float()
    maes, states = [], [state.cpu()]
    for t in range(steps):
        state = oracle.query(state, re)
        if corrector is not None:
            state = state + corrector(features(state, re))
        maes.append((state - ref[:, t + 1]).abs().flatten(1).mean(1).cpu())
        if keep_states:
            states.append(state.cpu())
    mae = torch.stack(maes, 1)  # (R, steps)
    out = {"steps": steps, "mae_per_re": {f"{float(r):g}": round(float(m), 5) for r, m in zip(data.test_re, mae.mean(1))},
           "mae": round(float(mae.mean()), 5), "mae_over_time": [round(float(v), 5) for v in mae.mean(0)],
           "oracle_rows": oracle.rows_used}
    if keep_states:
        out["states"] = torch.stack(states, 1)  # (R, steps + 1, 2, ny, nx)
    return out


def vorticity(state: torch.Tensor, setup: Any) -> torch.Tensor:
    """``(..., 2, ny, nx)`` -> ``(..., ny, nx)`` curl ``dv/dx - du/dy`` (central differences)."""
    dx, dy = setup.width / setup.nx, setup.height / setup.ny
    u, v = state[..., 0, :, :], state[..., 1, :, :]
    dvdx = torch.gradient(v, spacing=dx, dim=-1)[0]
    dudy = torch.gradient(u, spacing=dy, dim=-2)[0]
    return dvdx - dudy


def plot_results(cfg: SolConfig, data: SolData, evals: dict[str, dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for m, ev in evals.items():
        ax.plot(range(1, ev["steps"] + 1), ev["mae_over_time"], label=f"{METHOD_NAMES[m]} ({ev['mae']:.4f})")
    ax.set_xlabel("solver step")
    ax.set_ylabel("velocity MAE (mean over test Re)")
    ax.set_title("Rollout error on held-out Reynolds numbers")
    ax.legend()
    paths.append(save_figure(fig, out / "mae_over_time.png"))

    r = len(data.test_re) // 2
    t = next(iter(evals.values()))["steps"]
    panels = [(METHOD_NAMES[m], ev["states"][r, t]) for m, ev in evals.items() if "states" in ev]
    ref = vorticity(data.test[r, t], cfg.data.low)
    w = [vorticity(s, cfg.data.low) for _, s in panels]
    lim = float(torch.quantile(ref.abs().flatten(), 0.99)) or 1.0
    n = len(panels) + 1
    ext = (0, cfg.data.low.width, 0, cfg.data.low.height)
    fig, axes = plt.subplots(2, n, figsize=(1.9 * n + 1.2, 7.2), squeeze=False)
    for j, (title, wi) in enumerate([*zip([p[0] for p in panels], w), ("reference", ref)]):
        im = axes[0, j].imshow(wi.numpy(), origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim, extent=ext)
        axes[0, j].set_title(title, fontsize=8)
        if j < len(panels):
            err = (wi - ref).abs()
            im2 = axes[1, j].imshow(err.numpy(), origin="lower", cmap="magma", vmin=0, vmax=0.5 * lim, extent=ext)
            axes[1, j].set_title(f"|error| mean {float(err.mean()):.4f}", fontsize=8)
        else:
            axes[1, j].axis("off")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="vorticity")
    fig.colorbar(im2, ax=axes[1].tolist(), shrink=0.8, label="|vorticity error|")
    fig.suptitle(f"Re {float(data.test_re[r]):g} (held out), step {t}: corrected low-fidelity rollouts vs the "
                 "downsampled high-fidelity reference", fontsize=9)
    paths.append(save_figure(fig, out / "vorticity.png", tight=False))  # tight_layout fights shared colorbars
    return paths


def results_table(evals: dict[str, dict[str, Any]], train: dict[str, dict[str, Any]]) -> str:
    res = list(next(iter(evals.values()))["mae_per_re"])
    head = "| method | " + " | ".join(f"Re {r}" for r in res) + " | test MAE | vs SRC | queries | solver state-steps | train wall [s] |"
    sep = "|" + "---|" * (len(res) + 6)
    src = evals.get("src", {}).get("mae")
    rows = []
    for m, ev in evals.items():
        tr = train.get(m, {})
        rel = f"{100 * (ev['mae'] / src - 1):+.1f}%" if src else "-"
        q = tr.get("queries", "-")
        rows_ = tr.get("oracle_rows", tr.get("solver_state_steps", "-"))
        rows.append(f"| {METHOD_NAMES[m]} | " + " | ".join(f"{v:.4f}" for v in ev["mae_per_re"].values())
                    + f" | **{ev['mae']:.4f}** | {rel} | {q} | {rows_} | {tr.get('wall_s', '-')} |")
    return "\n".join([head, sep, *rows])


def evaluate_run(cfg: SolConfig, out: Path, methods: tuple[str, ...] = METHODS, *, data_dir: Optional[Path] = None,
                 plots: bool = True, data: Optional[SolData] = None) -> dict[str, Any]:
    """Evaluate every method trained in ``out`` (``src`` needs no training); write ``eval.json``,
    ``results.md`` and the plots."""
    torch.set_num_threads(1)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ConfigError(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}.")
    data = data or load(cfg.data, data_dir or out / "data")
    evals: dict[str, dict[str, Any]] = {}
    train: dict[str, dict[str, Any]] = {}
    skipped = []
    for m in methods:
        if m != "src" and not (out / m / "corrector.pt").exists():
            skipped.append(m)
            continue
        corr = None if m == "src" else load_corrector(cfg, data, out / m / "corrector.pt").eval()
        evals[m] = evaluate(cfg, data, corr, keep_states=plots)
        tj = out / m / "train.json"
        train[m] = json.loads(tj.read_text()) if tj.exists() else {"method": m}
    if not evals:
        raise ConfigError(f"none of the methods {', '.join(methods)} is trained in {out}; train them first "
                          "(`bbzo sol train --method ... --out ...`) or include src.")
    summary = {"eval": {m: {k: v for k, v in ev.items() if k != "states"} for m, ev in evals.items()},
               "train": train, "skipped_untrained": skipped}
    (out / "eval.json").write_text(json.dumps(summary, indent=1))
    md = results_table(evals, train)
    (out / "results.md").write_text(md + "\n")
    summary["table"] = md
    summary["plots"] = [str(p) for p in plot_results(cfg, data, evals, out)] if plots else []
    return summary


def run_sol(cfg: SolConfig, out: Path, *, methods: tuple[str, ...] = METHODS, data_dir: Optional[Path] = None,
            resume: bool = False, progress: bool = True, plots: bool = True) -> dict[str, Any]:
    """Generate (or reuse) data, train ``methods``, evaluate all on the test Re, write table + plots."""
    torch.set_num_threads(1)  # PhiFlow on a shared CPU: one thread is fastest (see the research notes)
    if not methods:
        raise ConfigError(f"no methods given; choose from {', '.join(METHODS)} (e.g. --methods src,zo).")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ConfigError(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    t0 = time.perf_counter()
    data = generate(cfg.data, data_dir or out / "data", progress=progress, device=cfg.device)
    gen_s = time.perf_counter() - t0
    train = {m: train_method(m, cfg, data, out, resume=resume, progress=progress) for m in methods}
    t1 = time.perf_counter()
    summary = evaluate_run(cfg, out, methods, plots=plots, data=data)
    summary.update({"config": cfg.to_dict(), "data_seconds": round(gen_s, 1), "data_meta": data.meta, "train": train,
                    "eval_seconds": round(time.perf_counter() - t1, 1),
                    "total_seconds": round(time.perf_counter() - t0, 1)})
    (out / "results.json").write_text(json.dumps({k: v for k, v in summary.items() if k not in ("table", "plots")},
                                                 indent=1))
    return summary
