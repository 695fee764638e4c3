"""What separates ZO-SOL from FO-SOL when both fine-tune NON: the estimator or the coordinates per step?

From a trained NON corrector (the ``non/corrector.pt`` of a ``sol_small`` seed folder), fine-tune on the
unrolled loss with the autograd gradient through PhiFlow (the white-box FO-SOL) in two variants that differ
only in which coordinates move per step:

* ``fo``: every coordinate (FO-SOL);
* ``fo_masked``: only the coordinates ZO-SOL estimates at that step (the same ZO-GraSP layer counts, the same
  seeded draws, biases dense: ``zo/lpr.json`` of the folder), with the *exact* gradient there.

``fo_masked`` is ZO-SOL with a perfect estimator: where it lands no better than ZO-SOL, the estimator's
noise is not what holds ZO-SOL back, the coordinate budget per step is. The same Adam,
learning rate and cosine schedule as ZO-SOL, the same batches. Reports validation MAE (long rollouts on the
training Re) and test MAE for each variant and step budget. Prints JSON.

    .venv/bin/python benchmarks/sol_small.py --seeds 0,1,2 --jobs 2 --run-dir runs/sol-small-seeds   # first
    .venv/bin/python benchmarks/sol_zo_budget.py --seed-dir runs/sol-small-seeds/seed0 --steps 300 \\
        --lr 3e-4,1e-3 --out benchmarks/results/sol_zo_budget.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed-dir", type=Path, required=True, help="a sol_small seed folder with non/ and zo/lpr.json")
    ap.add_argument("--steps", default="300", help="step budgets, comma-separated (each its own cosine schedule)")
    ap.add_argument("--variants", default="fo_masked,fo")
    ap.add_argument("--lr", help="learning rates, comma-separated (default: the ZO-SOL lr of the folder's settings)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from bbzo.config import resolve
    from bbzo.oracles.karman import KarmanSolver, phi
    from bbzo.optim import cosine_with_warmup
    from bbzo.provenance import provenance
    from bbzo.sparsity import DynamicSparsity, LayerRatios
    from bbzo.tasks.sol import RolloutBatches, SolSettings, evaluate, load, load_corrector, make_rollout
    from common import emit  # benchmarks/ is on sys.path when run as a script

    cfg_path = args.seed_dir / "zo" / "config.resolved.yaml"  # sol_small: every job is a run folder of its own
    if not cfg_path.exists():  # a seed folder of an earlier sol_small (one run folder per seed)
        cfg_path = args.seed_dir / "config.resolved.yaml"
    s, _ = resolve(SolSettings, {"no_progress": True}, cfg_path, "run")
    data = load(s.data, s.data_dir)
    lrs = [float(v) for v in args.lr.split(",")] if args.lr else [s.lr]
    rollout = make_rollout(KarmanSolver(s.data.low, backend="torch", jit=False).step, data.velocity_std())
    lpr = LayerRatios.load(args.seed_dir / "zo" / "lpr.json")
    non = load_corrector(s, data, args.seed_dir / "non" / "corrector.pt")
    start = {"val_mae": evaluate(s, data, non, split="train")["mae"], "test_mae": evaluate(s, data, non)["mae"]}
    rows: dict = {}
    combos = [(st, v, lr) for st in [int(x) for x in args.steps.split(",")]
              for v in [x.strip() for x in args.variants.split(",") if x.strip()] for lr in lrs]
    for steps, variant, lr in combos:
        model = load_corrector(s, data, args.seed_dir / "non" / "corrector.pt")
        params = dict(model.named_parameters())
        sampler = DynamicSparsity(lpr, {n: p.detach() for n, p in params.items()},
                                  resample_every=s.resample_every, seed=s.seed, others="dense")
        batches = RolloutBatches(data.train, data.train_re, s.unroll, s.batch, seed=s.seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = cosine_with_warmup(opt, steps, warmup_steps=steps // 20) if s.schedule == "cosine" else None
        t0, moved = time.perf_counter(), 0
        for step in range(steps):
            inputs, y = batches.get_batch(step)
            opt.zero_grad(set_to_none=True)
            with phi().TORCH:
                rollout(model, inputs, y).mean().backward()
            if variant == "fo_masked":
                coords = sampler.coords_at(step)
                for n, p in params.items():
                    keep = torch.zeros(p.numel(), dtype=torch.bool)
                    keep[coords[n]] = True
                    p.grad.view(-1).mul_(keep.to(p.grad.dtype))
                    moved += int(keep.sum())
            else:
                moved += sum(p.numel() for p in params.values())
            opt.step()
            if sched is not None:
                sched.step()
        model.eval()
        rows[f"{variant}@{steps},lr={lr:g}"] = {
            "variant": variant, "steps": steps, "lr": lr, "coords_per_step": moved // steps,
            "val_mae": round(evaluate(s, data, model, split="train")["mae"], 6),
            "test_mae": round(evaluate(s, data, model)["mae"], 6), "wall_s": round(time.perf_counter() - t0, 1)}
        print(rows[f"{variant}@{steps},lr={lr:g}"], file=sys.stderr, flush=True)
    emit({"benchmark": "sol_zo_budget", "seed_dir": str(args.seed_dir), "seed": s.seed,
          "schedule": s.schedule, "batch": s.batch, "unroll": s.unroll, "start_non": start, "runs": rows,
          "command": " ".join(["python", *sys.argv]), "provenance": provenance()}, args.out)


if __name__ == "__main__":
    main()
