"""How close is each method's step direction to the full unrolled gradient? NOG vs ZO-SOL's coordinates.

At a trained corrector of a ``sol_small`` seed folder (NON's, where NOG / ZO-SOL / FO-SOL start, and the
end point of each fine-tuning that is there), on ``--batches`` minibatches of ``--batch`` training windows
(the preset's unroll), compares with the **full gradient** ``g`` of the unrolled loss (autograd through
PhiFlow's torch backend, FO-SOL's; white-box, for measuring only):

* ``nog``: the stop-gradient gradient of the same loss (:func:`bbzo.tasks.sol.nog_rollout` through the
  query-only oracle): free, every coordinate, biased;
* ``masked``: ``g`` on the coordinates ZO-SOL estimates at that step (``zo/lpr.json``: the same layer counts
  and seeded draws, biases dense), zero elsewhere: ZO-SOL with a perfect estimator (``sol_zo_budget.py``
  shows ZO-SOL's estimate is that good);
* ``masked+nog``: ``g`` on those coordinates, NOG's gradient on all the others: what an estimator that
  completes Sparse-CGE with the free surrogate could reach at Sparse-CGE's query cost;
* ``masked+scaled_nog``: the same, with NOG's gradient first scaled by the least-squares factor that maps
  it onto ``g`` on the sampled coordinates (``alpha = <g_S, nog_S> / |nog_S|^2``: an estimator knows both
  there). NOG's gradient points the right way but is much shorter than ``g`` (the solver carries each
  correction into every later step's loss), so the unscaled completion mixes two scales.

For each: the cosine with ``g`` (per minibatch: mean, min, max; and of the gradients averaged over every
minibatch) and the norm ratio. ``|g|`` at NOG's end point says whether NOG stopped where the unrolled loss
still descends (its fixed point is not the loss's). Prints JSON.

    .venv/bin/python benchmarks/sol_gradient_alignment.py --seed-dir runs/sol-small-seeds/seed0 \\
        --out benchmarks/results/sol_gradient_alignment.json
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.detach().flatten() for g in grads.values()]).double()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm())) if a.norm() > 0 and b.norm() > 0 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed-dir", type=Path, required=True, help="a sol_small seed folder with non/ and zo/lpr.json")
    ap.add_argument("--at", default="non,nog,zo,fo", help="correctors to measure at (those trained in the folder)")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16, help="training windows per minibatch")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from bbzo.config import resolve
    from bbzo.oracles.karman import KarmanOracle, KarmanSolver, phi
    from bbzo.provenance import provenance
    from bbzo.sparsity import DynamicSparsity, LayerRatios
    from bbzo.tasks.sol import RolloutBatches, SolSettings, load, load_corrector, make_rollout, nog_rollout
    from common import emit  # benchmarks/ is on sys.path when run as a script

    cfg = args.seed_dir / "zo" / "config.resolved.yaml"  # sol_small: every job is a run folder of its own
    s, _ = resolve(SolSettings, {"no_progress": True}, cfg if cfg.exists() else args.seed_dir / "config.resolved.yaml",
                   "run")
    data = load(s.data, s.data_dir)
    std = data.velocity_std()
    full_rollout = make_rollout(KarmanSolver(s.data.low, backend="torch", jit=False).step, std)
    nog_roll = nog_rollout(KarmanOracle(s.data.low, backend="torch").query, std)
    lpr = LayerRatios.load(args.seed_dir / "zo" / "lpr.json")
    batches = RolloutBatches(data.train, data.train_re, s.unroll, args.batch, seed=s.seed)
    result: dict[str, Any] = {}
    for at in [m.strip() for m in args.at.split(",") if m.strip()]:
        path = args.seed_dir / at / "corrector.pt"
        if not path.exists():
            continue
        model = load_corrector(s, data, path)
        params = dict(model.named_parameters())
        names = list(params)
        sampler = DynamicSparsity(lpr, {n: p.detach() for n, p in params.items()}, resample_every=1, seed=s.seed,
                                  others="dense")
        offsets, start = {}, 0
        for n, p in params.items():
            offsets[n], start = start, start + p.numel()
        kinds = ("nog", "masked", "masked+nog", "masked+scaled_nog")
        rows: dict[str, list[float]] = {k: [] for k in kinds}
        norms: dict[str, list[float]] = {k: [] for k in ("full", *kinds)}
        sums = {k: torch.zeros(start, dtype=torch.float64) for k in ("full", *kinds)}
        alphas: list[float] = []
        for b in range(args.batches):
            inputs, y = batches.get_batch(b)
            with phi().TORCH:
                g = _flat(dict(zip(names, torch.autograd.grad(full_rollout(model, inputs, y).mean(), list(params.values())))))
            nog = _flat(dict(zip(names, torch.autograd.grad(nog_roll(model, inputs, y).mean(), list(params.values())))))
            mask = torch.zeros(start, dtype=torch.bool)
            for n, idx in sampler.coords_at(b).items():  # the LPR's draws; layers it does not name: dense
                mask[offsets[n] + idx] = True
            alpha = float(g[mask] @ nog[mask] / (nog[mask] @ nog[mask]))
            alphas.append(alpha)
            vecs = {"full": g, "nog": nog, "masked": torch.where(mask, g, 0.0), "masked+nog": torch.where(mask, g, nog),
                    "masked+scaled_nog": torch.where(mask, g, alpha * nog)}
            for k, v in vecs.items():
                sums[k] += v
                norms[k].append(float(v.norm()))
                if k != "full":
                    rows[k].append(_cos(v, g))
        result[at] = {
            "coords_per_step": int(mask.sum()), "params": start,
            "cos_with_full_per_batch": {k: {"mean": round(statistics.fmean(v), 4), "min": round(min(v), 4),
                                            "max": round(max(v), 4)} for k, v in rows.items()},
            "cos_with_full_of_the_mean": {k: round(_cos(sums[k], sums["full"]), 4) for k in rows},
            "norm_over_full": {k: round(statistics.fmean(a / f for a, f in zip(norms[k], norms["full"])), 4)
                               for k in rows},
            "scale_alpha": {"mean": round(statistics.fmean(alphas), 3), "min": round(min(alphas), 3),
                            "max": round(max(alphas), 3)},
            "full_grad_norm": round(statistics.fmean(norms["full"]), 6),
            "full_grad_norm_of_the_mean": round(float(sums["full"].norm()) / args.batches, 6),
        }
        print(f"{at}: " + ", ".join(f"cos({k}) {v['mean']:.3f}" for k, v in result[at]["cos_with_full_per_batch"].items())
              + f", |g| {result[at]['full_grad_norm']:.2e}", flush=True)
    emit({"benchmark": "sol_gradient_alignment", "seed_dir": str(args.seed_dir), "seed": s.seed, "unroll": s.unroll,
          "batches": args.batches, "batch": args.batch, "at": result,
          "command": "python benchmarks/sol_gradient_alignment.py " + " ".join(
              f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
          "provenance": provenance()}, args.out)


if __name__ == "__main__":
    main()
