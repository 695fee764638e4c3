"""The default main job: train a launch policy through a black-box projectile simulator.

A small MLP maps a shot request ``(target distance, drag coefficient, wind)`` to launch parameters
``(angle, speed)``; the numpy simulator (:class:`bbzo.oracles.ProjectileOracle`) says where the shot
lands. The loss is the squared miss (in units of 10 m) plus a small energy term (prefer slow shots),
so the only way to learn is to query the simulator. Runs CGE and, for comparison, RGE with the same
number of queries per step (DeepZero Fig. 2: CGE beats RGE at equal queries). Everything is
generated here; no dataset is needed.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import bbzo
from bbzo.data import TensorBatches
from bbzo.errors import ConfigError
from bbzo.logging import JSONLLogger, ProgressBar, read_jsonl, save_figure
from bbzo.models import mlp
from bbzo.optim import cosine_with_warmup, make_optimizer
from bbzo.oracles.projectile import ProjectileOracle, trajectories
from bbzo.trainer import Trainer

__all__ = ["DemoConfig", "make_data", "make_policy", "run_demo"]

# request ranges: distance [m], drag k [1/m], wind [m/s]
LOW = torch.tensor([15.0, 0.0, -4.0])
HIGH = torch.tensor([60.0, 0.02, 4.0])
MISS_SCALE = 10.0
ENERGY_WEIGHT = 0.05


@dataclass
class DemoConfig:
    steps: int = 1000
    batch: int = 64
    hidden: tuple[int, ...] = (16, 16)
    lr: float = 0.02
    mu: float = 1e-3
    estimators: tuple[str, ...] = ("cge", "rge")
    n_train: int = 4096
    n_test: int = 512
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int = 50
    extra: dict[str, Any] = field(default_factory=dict)


class LaunchHead(nn.Module):
    """Unbounded network outputs -> physically valid launch: angle in (0.05, 1.52) rad, speed in (8, 38) m/s."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        angle = 0.05 + (math.pi / 2 - 0.1) * torch.sigmoid(z[:, 0])
        speed = 8.0 + 30.0 * torch.sigmoid(z[:, 1])
        return torch.stack([angle, speed], dim=1)


def make_data(n: int, seed: int) -> torch.Tensor:
    """``(n, 3)`` shot requests, uniform in the ranges above."""
    g = torch.Generator().manual_seed(seed)
    return LOW + (HIGH - LOW) * torch.rand(n, 3, generator=g)


def make_policy(hidden: tuple[int, ...], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(Normalize(), *mlp(3, 2, hidden), LaunchHead())


class Normalize(nn.Module):
    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return 2 * (r - LOW.to(r)) / (HIGH - LOW).to(r) - 1


def make_loss(oracle: ProjectileOracle):
    """Per-sample loss: squared miss / 10 m plus energy; the oracle is queried with K*B rows."""

    def loss_fn(launch: torch.Tensor, req: torch.Tensor) -> torch.Tensor:
        landing = oracle.query(torch.cat([launch, req[:, 1:3]], dim=1))[:, 0]
        miss = (landing - req[:, 0]) / MISS_SCALE
        return miss ** 2 + ENERGY_WEIGHT * (launch[:, 1] / 30.0) ** 2

    return loss_fn


@torch.no_grad()
def evaluate(policy: nn.Module, requests: torch.Tensor) -> dict[str, float]:
    oracle = ProjectileOracle(name="projectile-sim(eval)")
    launch = policy(requests)
    landing = oracle.query(torch.cat([launch, requests[:, 1:3]], dim=1))[:, 0]
    err = (landing - requests[:, 0]).abs()
    return {"mae_m": float(err.mean()), "within_1m": float((err < 1.0).float().mean()),
            "mean_speed": float(launch[:, 1].mean())}


def train_one(name: str, cfg: DemoConfig, out: Path, resume: bool, progress: bool) -> dict[str, Any]:
    dev = torch.device(cfg.device)
    train_x = make_data(cfg.n_train, cfg.seed)
    policy = make_policy(cfg.hidden, cfg.seed).to(dev)
    d = sum(p.numel() for p in policy.parameters())
    oracle = ProjectileOracle()
    est = bbzo.create_estimator("cge", mu=cfg.mu) if name == "cge" else \
        bbzo.create_estimator("rge", q=d, mu=cfg.mu, seed=cfg.seed)  # same queries per step as CGE
    q_per_step = est.query_cost({n: p.detach() for n, p in policy.named_parameters()})
    opt = make_optimizer(policy.parameters(), "adam", lr=cfg.lr)
    sched = cosine_with_warmup(opt, cfg.steps, warmup_steps=cfg.steps // 20)
    run_dir = out / name
    trainer = Trainer(policy, make_loss(oracle), est, opt, TensorBatches(train_x, train_x, cfg.batch, seed=cfg.seed, device=dev),
                      max_steps=cfg.steps, scheduler=sched, oracle=oracle, run_dir=run_dir,
                      checkpoint_every=cfg.checkpoint_every)
    log = JSONLLogger(run_dir / "metrics.jsonl", extra={"estimator": name})
    if not resume and log.path.exists():
        log.path.unlink()
    log.attach(trainer)
    ProgressBar(desc=f"{name:>3} ({q_per_step} q/step)", disable=not progress).attach(trainer)
    if resume and trainer.checkpoint_path.exists():
        trainer.resume()
    test_x = make_data(cfg.n_test, cfg.seed + 1).to(dev)
    policy.eval()
    before = evaluate(make_policy(cfg.hidden, cfg.seed).to(dev).eval(), test_x)
    policy.train()
    t0 = time.perf_counter()
    trainer.run()
    wall = time.perf_counter() - t0
    policy.eval()
    after = evaluate(policy, test_x)
    torch.save(policy.state_dict(), run_dir / "policy.pt")
    return {"estimator": name, "params": d, "queries_per_step": q_per_step,
            "steps": trainer.step_count, "queries": trainer.queries_used, "oracle_rows": oracle.rows_used,
            "wall_s": round(wall, 1), "test_mae_before_m": round(before["mae_m"], 3),
            "test_mae_m": round(after["mae_m"], 3), "within_1m": round(after["within_1m"], 3),
            "final_train_loss": round(trainer.status.get("loss", float("nan")), 4)}


def plot(out: Path, cfg: DemoConfig, results: list[dict[str, Any]]) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        rows = read_jsonl(out / r["estimator"] / "metrics.jsonl")
        ax.plot([x["queries_used"] for x in rows], [x["loss"] for x in rows], label=r["estimator"].upper())
    ax.set_xlabel("loss queries (parameter sets x minibatch)")
    ax.set_ylabel("train loss")
    ax.set_yscale("log")
    ax.set_title("ZO training through a black-box simulator")
    ax.legend()
    paths.append(save_figure(fig, out / "curves.png"))

    dev = torch.device(cfg.device)
    req = torch.tensor([[20.0, 0.0, 0.0], [35.0, 0.01, -3.0], [50.0, 0.005, 3.0], [58.0, 0.015, 2.0]])
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 3.6), squeeze=False)
    for ax, r in zip(axes[0], results):
        policy = make_policy(cfg.hidden, cfg.seed).to(dev)
        policy.load_state_dict(torch.load(out / r["estimator"] / "policy.pt", weights_only=True, map_location=dev))
        with torch.no_grad():
            launch = policy.eval()(req.to(dev)).cpu()
        rows = torch.cat([launch, req[:, 1:3]], 1).numpy()
        for i, path in enumerate(trajectories(rows)):
            line, = ax.plot(path[:, 0], path[:, 1])
            ax.axvline(float(req[i, 0]), color=line.get_color(), ls=":", lw=1)
        ax.set_title(f"{r['estimator'].upper()}: test MAE {r['test_mae_m']:.2f} m (dotted: targets)")
        ax.set_xlabel("x [m]")
        ax.set_ylabel("height [m]")
    paths.append(save_figure(fig, out / "trajectories.png"))
    return paths


def table(results: list[dict[str, Any]]) -> str:
    head = "| estimator | params | queries/step | steps | total queries | oracle rows | wall [s] | test MAE before [m] | test MAE after [m] | within 1 m |"
    sep = "|" + "---|" * 10
    rows = [f"| {r['estimator']} | {r['params']} | {r['queries_per_step']} | {r['steps']} | {r['queries']} | "
            f"{r['oracle_rows']} | {r['wall_s']} | {r['test_mae_before_m']} | {r['test_mae_m']} | {r['within_1m']:.1%} |"
            for r in results]
    return "\n".join([head, sep, *rows])


def run_demo(cfg: DemoConfig, out: Path, resume: bool = False, progress: bool = True,
             plots: bool = True) -> dict[str, Any]:
    bad = [e for e in cfg.estimators if e not in ("cge", "rge")]
    if bad or not cfg.estimators:
        raise ConfigError(f"unknown estimator {bad[0] if bad else ''!r} for the demo; choose from cge, rge "
                          "(e.g. --estimators cge,rge).")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = [train_one(name, cfg, out, resume, progress) for name in cfg.estimators]
    summary = {"config": asdict(cfg), "results": results}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    md = table(results)
    (out / "results.md").write_text(md + "\n")
    summary["table"] = md
    summary["plots"] = [str(p) for p in plot(out, cfg, results)] if plots else []
    return summary
