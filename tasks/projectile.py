"""The projectile demo: train a launch policy through a black-box projectile simulator.

A small MLP maps a shot request ``(target distance, drag coefficient, wind)`` to launch parameters
``(angle, speed)``; the numpy simulator (:class:`bbzo.oracles.ProjectileOracle`) says where the shot
lands. The loss is the squared miss (in units of 10 m) plus a small energy term (prefer slow shots),
so the only way to learn is to query the simulator. Trains CGE and, for comparison, RGE with the same
number of queries per step (DeepZero Fig. 2: CGE beats RGE at equal queries). Everything is
generated here; no dataset is needed. ``bbzo demo`` runs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import bbzo
from bbzo.config import as_plain, setting
from bbzo.data import TensorBatches
from bbzo.errors import ConfigError
from bbzo.listeners import read_jsonl, save_figure
from bbzo.models import mlp
from bbzo.objective import OracleObjective
from bbzo.optim import cosine_with_warmup, make_optimizer
from bbzo.oracles.projectile import ProjectileOracle, trajectories
from bbzo.run import BuildContext, Run, Training
from bbzo.task import RunSettings, Task, register_task

__all__ = ["DemoSettings", "make_data", "make_policy", "TASK"]

# request ranges: distance [m], drag k [1/m], wind [m/s]
LOW = torch.tensor([15.0, 0.0, -4.0])
HIGH = torch.tensor([60.0, 0.02, 4.0])
MISS_SCALE = 10.0
ENERGY_WEIGHT = 0.05
ESTIMATORS = ("cge", "rge")


@dataclass
class DemoSettings(RunSettings):
    out: Path = setting(Path("runs/demo"), help="Run folder: metrics, checkpoints, results table and plots.",
                        kind="path", runtime=True)
    steps: int = setting(1000, help="Training steps per estimator.", runtime=True)
    batch: int = setting(64, help="Shot requests per minibatch.")
    estimators: tuple[str, ...] = setting(ESTIMATORS, help="Comma-separated estimators to compare (RGE gets q = d: "
                                          "the same queries per step).", runtime=True)
    lr: float = setting(0.02, help="Adam learning rate.")
    mu: float = setting(1e-3, help="Finite-difference step.")
    hidden: tuple[int, ...] = setting((16, 16), help="Hidden layer widths of the policy MLP.")
    n_train: int = setting(4096, help="Shot requests to train on.")
    n_test: int = setting(512, help="Held-out shot requests to evaluate on.")
    seed: int = setting(0, help="Seed of the data, the policy init, the batches and RGE's directions.")
    device: str = setting("cpu", help="cpu, cuda, cuda:1, ...", runtime=True)
    checkpoint_every: int = setting(50, help="Checkpoint every N steps.", runtime=True)

    def __post_init__(self) -> None:
        bad = [e for e in self.estimators if e not in ESTIMATORS]
        if bad or not self.estimators:
            raise ConfigError(f"unknown estimator {bad[0] if bad else ''!r} for the demo; choose from cge, rge "
                              "(e.g. --estimators cge,rge).")


class LaunchHead(nn.Module):
    """Unbounded network outputs -> physically valid launch: angle in (0.05, 1.52) rad, speed in (8, 38) m/s."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        angle = 0.05 + (math.pi / 2 - 0.1) * torch.sigmoid(z[:, 0])
        speed = 8.0 + 30.0 * torch.sigmoid(z[:, 1])
        return torch.stack([angle, speed], dim=1)


class Normalize(nn.Module):
    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return 2 * (r - LOW.to(r)) / (HIGH - LOW).to(r) - 1


def make_data(n: int, seed: int) -> torch.Tensor:
    """``(n, 3)`` shot requests, uniform in the ranges above."""
    g = torch.Generator().manual_seed(seed)
    return LOW + (HIGH - LOW) * torch.rand(n, 3, generator=g)


def make_policy(hidden: tuple[int, ...], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(Normalize(), *mlp(3, 2, hidden), LaunchHead())


def _rows(launch: torch.Tensor, requests: torch.Tensor, targets: Any) -> torch.Tensor:
    """Oracle rows ``(N, 4)``: the launch ``(angle, speed)`` and the request's ``(drag, wind)``."""
    return torch.cat([launch, requests[:, 1:3]], dim=1)


def _loss(answers: torch.Tensor, launch: torch.Tensor, requests: torch.Tensor, targets: Any) -> torch.Tensor:
    """Per-sample loss: squared miss / 10 m plus energy."""
    miss = (answers[:, 0] - requests[:, 0]) / MISS_SCALE
    return miss ** 2 + ENERGY_WEIGHT * (launch[:, 1] / 30.0) ** 2


def _evaluate(oracle: ProjectileOracle, requests: torch.Tensor):
    @torch.no_grad()
    def evaluate(policy: nn.Module) -> dict[str, float]:
        was = policy.training
        launch = policy.eval()(requests)
        policy.train(was)
        landing = oracle.query(_rows(launch, requests, None))[:, 0]
        err = (landing - requests[:, 0]).abs()
        return {"mae_m": float(err.mean()), "within_1m": float((err < 1.0).float().mean()),
                "mean_speed": float(launch[:, 1].mean())}
    return evaluate


def build(s: DemoSettings, name: str, ctx: BuildContext) -> Training:
    dev = torch.device(s.device)
    train_x = make_data(s.n_train, s.seed)
    policy = make_policy(s.hidden, s.seed).to(dev)
    d = sum(p.numel() for p in policy.parameters())
    oracle = ProjectileOracle()
    est = bbzo.create_estimator("cge", mu=s.mu) if name == "cge" else \
        bbzo.create_estimator("rge", q=d, mu=s.mu, seed=s.seed)  # same queries per step as CGE
    q = est.query_cost({n: p.detach() for n, p in policy.named_parameters()})
    opt = make_optimizer(policy.parameters(), "adam", lr=s.lr)
    return Training(
        model=policy, objective=OracleObjective(oracle, _loss, _rows), estimator=est, optimizer=opt,
        data=TensorBatches(train_x, None, s.batch, seed=s.seed, device=dev), steps=s.steps,
        scheduler=cosine_with_warmup(opt, s.steps, warmup_steps=s.steps // 20), oracles=[oracle],
        evaluate=_evaluate(oracle, make_data(s.n_test, s.seed + 1).to(dev)), checkpoint_every=s.checkpoint_every,
        weights="policy.pt", desc=f"{name:>3} ({q} q/step)", log_extra={"estimator": name})


def plot(out: Path, s: DemoSettings, results: list[dict[str, Any]]) -> list[Path]:
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

    dev = torch.device(s.device)
    req = torch.tensor([[20.0, 0.0, 0.0], [35.0, 0.01, -3.0], [50.0, 0.005, 3.0], [58.0, 0.015, 2.0]])
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 3.6), squeeze=False)
    for ax, r in zip(axes[0], results):
        policy = make_policy(s.hidden, s.seed).to(dev)
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


def evaluate(s: DemoSettings, run: Run, summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    results = []
    for name, t in summaries.items():
        results.append({"estimator": name, "params": t["params"], "queries_per_step": t["queries_per_step"],
                        "steps": t["steps"], "queries": t["queries"], "oracle_rows": t["oracle_rows"],
                        "wall_s": t["wall_s"], "test_mae_before_m": round(t["eval_initial"]["mae_m"], 3),
                        "test_mae_m": round(t["eval_final"]["mae_m"], 3),
                        "within_1m": round(t["eval_final"]["within_1m"], 3),
                        "final_train_loss": round(t.get("final_train_loss") or float("nan"), 4)})
    plots = [str(p) for p in plot(run.folder, s, results)] if run.plots else []
    return {"config": as_plain(s), "results": results, "table": table(results), "plots": plots}


def _trainings(s: DemoSettings) -> tuple[str, ...]:
    return s.estimators


TASK = register_task(Task(name="projectile", settings=DemoSettings, trainings=_trainings, build=build,
                          evaluate=evaluate, threads=None,
                          description="train a launch policy through a black-box numpy projectile simulator"))
