"""Why NON varied 2x between seeds, and how it was tuned: NON alone over seeds and training settings.

On the ``small`` preset's data, NON (the supervised one-step corrector, batch 32, Adam) for each setting
and seed: validation MAE (long rollouts on the training Re: what the setting is chosen by), test MAE
(held-out Re) and the mean one-step training loss of its last 50 steps. The settings:

* ``old_default``: the small preset before the seeds issue (600 steps, constant lr 1e-3): the 2x spread;
* ``cosine600``: the same 600 steps, cosine decay: the final iterate stops being a random point of the
  constant-lr noise ball;
* ``cosine2400``: 4x the steps (NON is cheap: no solver query per step, 594 pair queries once);
* ``cosine2400_lr3e-3``: the shipped setting (also lr 3e-3).

Prints JSON with per-seed values and mean / std / min / max per setting.

    .venv/bin/python benchmarks/sol_non_sweep.py --jobs 2 --out benchmarks/results/sol_non_sweep.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

SETTINGS: dict[str, dict[str, Any]] = {
    "old_default": {"non_steps": 600, "non_lr": 1e-3, "non_schedule": "constant"},
    "cosine600": {"non_steps": 600, "non_lr": 1e-3, "non_schedule": "cosine"},
    "cosine2400": {"non_steps": 2400, "non_lr": 1e-3, "non_schedule": "cosine"},
    "cosine2400_lr3e-3": {"non_steps": 2400, "non_lr": 3e-3, "non_schedule": "cosine"},
}


def one(job: tuple[str, int, str, str]) -> tuple[str, int, dict[str, Any]]:
    name, seed, run_dir, data_dir = job
    import torch

    torch.set_num_threads(1)
    from bbzo.config import resolve
    from bbzo.listeners import read_jsonl
    from bbzo.run import run_task
    from bbzo.tasks.sol import TASK, SolSettings

    out = Path(run_dir) / name / f"seed{seed}"
    s, src = resolve(SolSettings, {"preset": "small", "methods": ("non",), "out": out, "data_dir": Path(data_dir),
                                   "no_progress": True, "no_plots": True, "overwrite": True, "seed": seed,
                                   "validate": True, **SETTINGS[name]})
    t0 = time.perf_counter()
    r = run_task(TASK, s, src)
    rows = read_jsonl(out / "non" / "metrics.jsonl")
    last = [x["loss"] for x in rows[-50:]]
    return name, seed, {"test_mae": r["eval"]["non"]["mae"], "val_mae": round(r["eval"]["non"]["val_mae"], 6),
                        "one_step_loss_last50": statistics.fmean(last), "seconds": round(time.perf_counter() - t0, 1)}


def spread(v: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(v), 5), "std": round(statistics.stdev(v), 5) if len(v) > 1 else 0.0,
            "min": round(min(v), 5), "max": round(max(v), 5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--run-dir", default="runs/sol-non-sweep")
    ap.add_argument("--data-dir", default="runs/sol-data")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from bbzo.config import resolve
    from bbzo.provenance import provenance
    from bbzo.tasks.sol import SolSettings, generate
    from common import emit  # benchmarks/ is on sys.path when run as a script

    s0, _ = resolve(SolSettings, {"preset": "small", "data_dir": Path(args.data_dir)})
    generate(s0.data, s0.data_dir, progress=False)  # once, before the workers share the cache
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    seeds = [int(v) for v in args.seeds.split(",")]
    jobs = [(n, sd, args.run_dir, args.data_dir) for n in names for sd in seeds]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        done = list(pool.map(one, jobs))
    res: dict[str, Any] = {n: {"settings": SETTINGS[n], "seeds": {}} for n in names}
    for n, sd, r in done:
        res[n]["seeds"][str(sd)] = r
        print(n, sd, r, file=sys.stderr, flush=True)
    for n in names:
        per = res[n]["seeds"].values()
        res[n]["test_mae"] = spread([r["test_mae"] for r in per])
        res[n]["val_mae"] = spread([r["val_mae"] for r in per])
    emit({"benchmark": "sol_non_sweep", "preset": "small", "seeds": seeds, "results": res,
          "total_seconds": round(time.perf_counter() - t0, 1), "command": " ".join(["python", *sys.argv]),
          "provenance": provenance()}, args.out)


if __name__ == "__main__":
    main()
