"""Chain-rule estimation vs parameter-space estimation on the heater example (issue: custom simulators, round two).

The heater (``examples/custom_simulator``): an MLP maps two wanted temperatures to two heater settings and
the simulator says which temperatures they reach. For ``cge`` (parameter-space CGE, the reference),
``rge`` (q = d: the same queries per step) and ``oracle_cge`` (CGE over the simulator's 2 inputs, then
autograd through the model), all with ``bbzo train``'s settings of ``run.yaml`` and the simulator's numpy
twin (the same numbers as the awk program), this measures the queries and the wall time to reach the
validation MSE that ``cge`` reaches after 300 steps (``query_ratio`` = cge's queries / oracle_cge's
queries to that loss). Then a wide MLP (``--wide`` hidden units, > 100k parameters) through the same
simulator, where parameter-space CGE costs d + 1 queries per step: ``oracle_cge`` trains it with 3.
Prints JSON.

    .venv/bin/python benchmarks/oracle_cge.py --out benchmarks/results/oracle_cge_heater.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from common import emit  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples" / "custom_simulator"


def train(est: str, out: Path, steps: int, eval_every: int, **over: Any) -> dict[str, Any]:
    from bbzo.config import resolve
    from bbzo.listeners import read_jsonl
    from bbzo.run import run_task
    from bbzo.tasks.custom import TASK, TrainSettings

    s, src = resolve(TrainSettings, {"oracle": f"{EX / 'heater.py'}:simulate", "estimator": est, "steps": steps,
                                     "eval_every": eval_every, "out": out, "overwrite": True, "no_progress": True,
                                     "no_plots": True, **over}, EX / "run.yaml", "train")
    t0 = time.perf_counter()
    res = run_task(TASK, s, src)
    rows = read_jsonl(out / "metrics.jsonl")
    curve = [(r["step"], r["queries_used"], r["elapsed_s"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    return {"estimator": est, "steps": res["steps"], "queries_per_step": res["queries_per_step"],
            "queries": res["queries_used"], "val_loss_initial": res["val_loss_initial"],
            "val_loss_final": res["val_loss_final"], "wall_s": round(time.perf_counter() - t0, 2), "curve": curve,
            "params": res["params"]}


def reach(run: dict[str, Any], target: float) -> Optional[dict[str, Any]]:
    """The first evaluation at or below ``target``: step, queries, seconds."""
    for step, queries, secs, loss in run["curve"]:
        if loss <= target:
            return {"step": step, "queries": queries, "seconds": round(secs, 2), "val_loss": loss}
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, default=Path("runs/oracle_cge"))
    ap.add_argument("--wide", type=int, default=320, help="hidden units of the wide MLP (2 -> wide -> wide -> 2)")
    ap.add_argument("--wide-steps", type=int, default=1200)
    ap.add_argument("--wide-lr", type=float, default=3e-3, help="Adam lr of the wide MLP (0.05 of run.yaml is for 82 parameters)")
    ap.add_argument("--oracle-steps", default="300,600,1200",
                    help="schedule lengths oracle_cge is run with (each its own cosine schedule); the first to reach "
                         "cge's loss gives query_ratio")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from bbzo.provenance import provenance

    runs = {"cge": train("cge", args.run_dir / "cge", 300, 10)}
    target = runs["cge"]["val_loss_final"]
    runs["rge"] = train("rge", args.run_dir / "rge", 300, 10)
    for n in [int(v) for v in args.oracle_steps.split(",")]:
        key = "oracle_cge" if n == 300 else f"oracle_cge_{n}_steps"
        runs[key] = train("oracle_cge", args.run_dir / key, n, 1)
    reached = {k: reach(r, target) for k, r in runs.items()}
    hits = [(h["queries"], k) for k, h in reached.items() if h is not None and k.startswith("oracle_cge")]
    best = min(hits)[1] if hits else None  # the fewest queries with which oracle_cge reached cge's loss
    ratio = round(reached["cge"]["queries"] / reached[best]["queries"], 1) if best else None

    # a wide MLP: d + 1 queries per step for parameter-space CGE, 3 for oracle_cge
    wide_model = f"{Path(__file__).resolve().parent / 'oracle_cge.py'}:wide_mlp"
    wide = train("oracle_cge", args.run_dir / "wide", args.wide_steps, 25, model=wide_model,
                 model_kwargs={"hidden": args.wide}, lr=args.wide_lr)
    from bbzo.config import resolve
    from bbzo.tasks.custom import TrainSettings, build

    s, _ = resolve(TrainSettings, {"oracle": f"{EX / 'heater.py'}:simulate", "estimator": "cge", "model": wide_model,
                                   "model_kwargs": {"hidden": args.wide}, "out": args.run_dir / "wide-cge",
                                   "overwrite": True}, EX / "run.yaml", "train")
    from bbzo.ledger import QueryLedger
    from bbzo.run import BuildContext, Run
    from bbzo.tasks.custom import TASK

    spec = build(s, "", BuildContext(Run(s.out, TASK, s), "", Path(s.out), False, QueryLedger()))
    import bbzo
    from bbzo.adapters import make_adapter
    from bbzo.step import estimate

    t0 = time.perf_counter()
    x, y = spec.data.get_batch(0)
    sub = {n: torch.arange(min(p.numel(), 64)) for n, p in spec.model.named_parameters()}  # time 1 step on a slice
    res = estimate(make_adapter(spec.model), bbzo.create_estimator("sparse_cge", coords=sub, mu=s.mu),
                        spec.objective, x, y)
    per_query = (time.perf_counter() - t0) / res.queries
    spec.oracles[0].close()
    d = sum(p.numel() for p in spec.model.parameters())
    out = {
        "benchmark": "oracle_cge", "example": "heater (examples/custom_simulator, numpy twin of heater.awk)",
        "settings": "run.yaml: batch 32, Adam lr 0.05, cosine (5% warm-up), mu 1e-3; cge and rge 300 steps",
        "target_val_loss": target, "runs": runs, "reached_target": reached,
        "query_ratio_definition": "queries cge needed to first reach its own 300-step validation loss / queries "
                                  "oracle_cge needed to first reach it (best of its schedule lengths)",
        "query_ratio": ratio, "oracle_cge_run": best,
        "wall_ratio": round(reached["cge"]["seconds"] / reached[best]["seconds"], 1) if best else None,
        "wide_mlp": {"params": d, "hidden": args.wide, "steps": args.wide_steps, "lr": args.wide_lr, "oracle_cge": {k: wide[k] for k in wide if k != "curve"},
                     "oracle_cge_curve": wide["curve"], "cge_queries_per_step": d + 1,
                     "cge_seconds_per_step_estimated": round(per_query * (d + 1), 1)},
        "command": " ".join(["python", *sys.argv]), "provenance": provenance(),
    }
    emit(out, args.out)


class _Celsius(nn.Module):
    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return (t - 17.0) / 6.0


def wide_mlp(hidden: int = 320) -> nn.Sequential:
    """The heater's policy, wide: 2 -> hidden -> hidden -> 2 settings in (0, 1) (> 100k parameters at 320)."""
    return nn.Sequential(_Celsius(), nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, 2), nn.Sigmoid())


if __name__ == "__main__":
    main()
