"""Common random numbers on a stochastic simulator: the CGE estimate's variance and the training result, with and
without a shared seed per step, side by side (issue 28).

The simulator is ``examples/stochastic_simulator/heater_mc.py`` (the heater of the custom-simulator example under
random weather, 8 Monte Carlo paths per answer) as an :class:`~bbzo.oracle.Oracle` with its own seeded noise
stream, so both arms are reproducible. Everything else is ``run.yaml``'s: the 82-parameter policy, batch 32, CGE
(83 queries per step), Adam lr 0.05 with the cosine schedule of ``bbzo train`` (5% warm-up), 300 steps.

* **without CRN** every call draws fresh noise for every row (what most simulators do): a step's base query and
  its probes see different weather;
* **with CRN** the :class:`~bbzo.trainer.Trainer` hands every query of step ``t`` the seed ``step_seed(seed, t)``
  (``Trainer(crn_seed=seed)``), so the base and every probe of a step see the same weather, and steps differ.

Part 1, the estimate: at the initial policy and the first minibatch, ``--repeats`` CGE estimates per arm (CRN:
step seeds 1..R; no CRN: the oracle's stream), against the gradient of the *expected* loss (4,096 paths under a
fixed seed, central differences at the same mu): the summed per-coordinate variance, the mean squared error,
the relative RMS error and the cosine. Part 2, training: ``--seeds`` runs per arm; the result is the expected
validation loss (the same 4,096-path evaluation for both arms) of the final policy, with the paired gap per seed.
Both parts at the configured mu (1e-3) and at 10x (1e-2), the same settings for both arms. Prints JSON.

    .venv/bin/python benchmarks/crn.py --out benchmarks/results/crn.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import emit  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples" / "stochastic_simulator"
sys.path.insert(0, str(EX))
import heater_mc  # noqa: E402  -- the example, by path


def data(seed: int = 0, n: int = 2048, val_fraction: float = 0.1):
    """``bbzo train``'s split of ``heater_mc.make_data``: (train x, train y, val x, val y)."""
    x, y = heater_mc.make_data(n, seed=0)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = math.floor(val_fraction * n)
    return x[perm[n_val:]], y[perm[n_val:]], x[perm[:n_val]], y[perm[:n_val]]


def expected_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared error of the *expected* temperatures (4,096 paths, a fixed seed) to the wanted ones."""
    with torch.no_grad():
        u = model(x).double().numpy()
    return float(((heater_mc.expected(u) - y.double().numpy()) ** 2).mean())


def objective(oracle: Any) -> Any:
    from bbzo.tasks.custom import make_objective

    return make_objective(oracle, "mse", ["outputs"])


def policy(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return heater_mc.build()


def reference_grad(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mu: float) -> torch.Tensor:
    """The gradient of the expected loss (4,096 paths under one seed: smooth), central differences at ``mu``."""
    import bbzo
    from bbzo.oracle import FunctionOracle

    o = FunctionOracle(lambda u: heater_mc.expected(u), numpy=True, name="expected")
    g = bbzo.estimate_grad(model, objective(o), x, y, bbzo.create_estimator("cge", mu=mu, difference="central"),
                           set_grad=False)
    return torch.cat([g[n].reshape(-1) for n, _ in model.named_parameters()]).double()


def estimates(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mu: float, crn: bool, repeats: int,
              seed: int) -> torch.Tensor:
    """``(R, d)`` CGE estimates: with CRN the seed of steps 1..R, without it the oracle's own noise stream."""
    import bbzo
    from bbzo.oracle import common_random_numbers, step_seed

    oracle = heater_mc.MonteCarloHeater(noise_seed=seed)
    obj = objective(oracle)
    out = []
    for r in range(1, repeats + 1):
        with common_random_numbers(step_seed(seed, r) if crn else None):
            g = bbzo.estimate_grad(model, obj, x, y, bbzo.create_estimator("cge", mu=mu), set_grad=False)
        out.append(torch.cat([g[n].reshape(-1) for n, _ in model.named_parameters()]).double())
    return torch.stack(out)


def variance_part(mu: float, repeats: int, seed: int) -> dict[str, Any]:
    from bbzo.data import TensorBatches

    xtr, ytr, _, _ = data(seed)
    x, y = TensorBatches(xtr, ytr, 32, seed=seed).get_batch(0)
    model = policy(seed)
    ref = reference_grad(model, x, y, mu)
    out: dict[str, Any] = {"mu": mu, "repeats": repeats, "reference_norm": float(ref.norm())}
    for arm, crn in (("no_crn", False), ("crn", True)):
        t0 = time.perf_counter()
        g = estimates(model, x, y, mu, crn, repeats, seed)
        err = g - ref
        cos = torch.nn.functional.cosine_similarity(g, ref[None], dim=1)
        out[arm] = {"total_variance": float(g.var(0).sum()), "mse": float(err.pow(2).sum(1).mean()),
                    "relative_rmse": float(err.pow(2).sum(1).mean().sqrt() / ref.norm()),
                    "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                    "seconds": round(time.perf_counter() - t0, 1)}
    out["variance_ratio"] = out["no_crn"]["total_variance"] / out["crn"]["total_variance"]
    out["mse_ratio"] = out["no_crn"]["mse"] / out["crn"]["mse"]
    return out


def train(mu: float, crn: bool, seed: int, steps: int, eval_every: int) -> dict[str, Any]:
    """One ``run.yaml`` training with the Trainer directly (CRN: ``Trainer(crn_seed=seed)``)."""
    import bbzo
    from bbzo.data import TensorBatches
    from bbzo.optim import cosine_with_warmup, make_optimizer
    from bbzo.trainer import Trainer

    xtr, ytr, xva, yva = data(seed)
    model = policy(seed)
    oracle = heater_mc.MonteCarloHeater(noise_seed=10_000 + seed)
    opt = make_optimizer(model.parameters(), "adam", lr=0.05)
    sched = cosine_with_warmup(opt, steps, warmup_steps=max(1, steps // 20))
    tr = Trainer(model, objective(oracle), bbzo.create_estimator("cge", mu=mu), opt, TensorBatches(xtr, ytr, 32, seed=seed),
                 max_steps=steps, scheduler=sched, oracle=oracle, crn_seed=seed if crn else None)
    curve = [(0, expected_loss(model, xva, yva))]
    t0 = time.perf_counter()
    while not tr.done:
        tr.run(steps=eval_every)
        curve.append((tr.step_count, expected_loss(model, xva, yva)))
    return {"seed": seed, "final": curve[-1][1], "initial": curve[0][1], "curve": curve,
            "queries": tr.ledger.queries, "seconds": round(time.perf_counter() - t0, 1)}


def spread(v: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0, "min": min(v), "max": max(v)}


def training_part(mu: float, seeds: list[int], steps: int, eval_every: int) -> dict[str, Any]:
    runs = {arm: [train(mu, arm == "crn", s, steps, eval_every) for s in seeds] for arm in ("no_crn", "crn")}
    gaps = [a["final"] - b["final"] for a, b in zip(runs["no_crn"], runs["crn"])]
    return {"mu": mu, "seeds": seeds, "steps": steps, "runs": runs,
            "final_expected_val_loss": {arm: spread([r["final"] for r in rs]) for arm, rs in runs.items()},
            "paired_gap_no_crn_minus_crn": spread(gaps), "crn_better_in": sum(g > 0 for g in gaps)}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bbzo.listeners import save_figure

    parts = result["training"]
    fig, axes = plt.subplots(1, len(parts), figsize=(5 * len(parts), 3.8), squeeze=False)
    for ax, part in zip(axes[0], parts):
        for arm, color in (("no_crn", "tab:red"), ("crn", "tab:blue")):
            for i, r in enumerate(part["runs"][arm]):
                st, loss = zip(*r["curve"])
                ax.plot(st, loss, color=color, alpha=0.6, label=("with" if arm == "crn" else "without") +
                        " common random numbers" if i == 0 else None)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("expected validation MSE [deg C^2]")
        ax.set_title(f"stochastic heater, CGE, mu {part['mu']:g} ({len(part['seeds'])} seeds)", fontsize=9)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mus", default="1e-3,1e-2", help="finite-difference steps (both arms at each)")
    ap.add_argument("--repeats", type=int, default=64, help="CGE estimates per arm for the variance")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="training seeds per arm")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plot", type=Path, help="loss curves (default: next to --out, .png)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from bbzo.provenance import provenance

    mus = [float(m) for m in args.mus.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    prov = provenance()  # the tree as the run starts
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "crn", "example": "examples/stochastic_simulator/heater_mc.py (heater under random weather, "
        "8 Monte Carlo paths per answer; MonteCarloHeater with its own seeded noise stream)",
        "settings": "run.yaml: 82-parameter policy, batch 32, cge (83 queries/step), Adam lr 0.05, cosine (5% warm-up), "
                    f"{args.steps} steps; CRN: Trainer(crn_seed=seed), step t gets step_seed(seed, t)",
        "metric": "expected validation MSE: the mean over the 204 held-out rows of the squared error of the expected "
                  "temperatures (4,096 paths, seed 12345) to the wanted ones",
        "variance": [variance_part(mu, args.repeats, 0) for mu in mus],
        "training": [training_part(mu, seeds, args.steps, args.eval_every) for mu in mus],
        "seeds": {"training": seeds, "variance_model_and_batch": 0, "variance_crn_step_seeds": f"step_seed(0, 1..{args.repeats})",
                  "oracle_noise": "MonteCarloHeater(noise_seed=seed) for the variance, 10000 + seed for training",
                  "evaluation": 12345},
        "wall_s": None, "command": " ".join(["python", *sys.argv]), "provenance": prov,
    }
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.out or args.plot:
        plot(result, args.plot or args.out.with_suffix(".png"))
    emit(result, args.out)


if __name__ == "__main__":
    main()
