"""ZO-SOL at CPU scale over seeds: test MAE of SRC / NON / ZO-SOL / FO-SOL on held-out Re. Prints JSON.

Runs the ``sol`` task with the ``small`` preset for every seed of ``--seeds`` (the seed drives the corrector
init, the batches, the ZO-GraSP score and the sparse draws, for NON and FO-SOL too), each in
``RUN_DIR/seed<k>``, on data it generates once (cached in ``--data-dir``), and writes per method the MAE of
every seed, the mean, the sample std and the range, the per-Re means, the costs, the settings, the
command, the git commit and the versions to ``--out-json`` (and a plot of the spread next to it).
``--jobs 2`` runs two seeds side by side (one torch thread each). Override any setting with KEY=VALUE
(JSON values), e.g. ``steps=600``.

    .venv/bin/python benchmarks/sol_small.py --seeds 0,1,2 --jobs 2 --out-json benchmarks/results/sol_small.json

Paper (full scale, GPU): SRC 0.180, NON 0.153, ZO-SOL 0.119, FO-SOL 0.074.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import emit  # benchmarks/ is on sys.path when run as a script


PAPER = {"src": 0.180, "non": 0.153, "zo": 0.119, "fo": 0.074}


def _settings(args: argparse.Namespace, seed: int, over: dict[str, Any]) -> tuple[Any, dict[str, str]]:
    from bbzo.config import resolve
    from bbzo.tasks.sol import SolSettings

    return resolve(SolSettings, {"preset": args.preset, "out": args.run_dir / f"seed{seed}", "data_dir": args.data_dir,
                                 "methods": args.methods, "no_progress": True, "no_plots": not args.plots,
                                 "seed": seed, **over})


def run_seed(args: argparse.Namespace, seed: int, over: dict[str, Any]) -> dict[str, Any]:
    """One seed in this process (1 torch thread): the task's results for it."""
    from bbzo.run import run_task
    from bbzo.tasks.sol import TASK

    s, sources = _settings(args, seed, over)
    t0 = time.perf_counter()
    res = run_task(TASK, s, sources)
    res.pop("plots", None)
    res["seed_seconds"] = round(time.perf_counter() - t0, 1)
    return res


def _spread(values: list[float]) -> dict[str, Any]:
    return {"mean": round(statistics.fmean(values), 5),
            "std": round(statistics.stdev(values), 5) if len(values) > 1 else 0.0,
            "min": round(min(values), 5), "max": round(max(values), 5)}


def summarize(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per method: every seed's test MAE, mean, sample std, range; per-Re means; the goals of the issue."""
    seeds = sorted(per_seed)
    methods = list(per_seed[seeds[0]]["eval"])
    test_mae: dict[str, Any] = {}
    per_re: dict[str, Any] = {}
    for m in methods:
        vals = {s: per_seed[s]["eval"][m]["mae"] for s in seeds}
        test_mae[m] = {**_spread(list(vals.values())), "seeds": {str(s): v for s, v in vals.items()}}
        res = list(per_seed[seeds[0]]["eval"][m]["mae_per_re"])
        per_re[m] = {r: round(statistics.fmean(per_seed[s]["eval"][m]["mae_per_re"][r] for s in seeds), 5) for r in res}
    out: dict[str, Any] = {"test_mae": test_mae, "test_mae_per_re_mean": per_re}
    if all("val_mae" in per_seed[s]["eval"][m] for s in seeds for m in methods):  # what settings were chosen by
        out["val_mae"] = {m: {**_spread([per_seed[s]["eval"][m]["val_mae"] for s in seeds]),
                              "seeds": {str(s): round(per_seed[s]["eval"][m]["val_mae"], 6) for s in seeds}}
                          for m in methods}
    if "src" in test_mae:
        src = test_mae["src"]["mean"]
        out["vs_src_mean"] = {m: round(v["mean"] / src - 1, 4) for m, v in test_mae.items()}
    if {"non", "zo"} <= set(test_mae):
        gap = test_mae["non"]["mean"] - test_mae["zo"]["mean"]
        spread = max(test_mae["non"]["std"], test_mae["zo"]["std"])
        wins = sum(per_seed[s]["eval"]["zo"]["mae"] < per_seed[s]["eval"]["non"]["mae"] for s in seeds)
        paired = [per_seed[s]["eval"]["non"]["mae"] - per_seed[s]["eval"]["zo"]["mae"] for s in seeds]
        out["zo_vs_non"] = {"gap": round(gap, 5), "larger_std": spread, "gap_over_spread": round(gap / spread, 2)
                            if spread else None, "zo_better_in_seeds": f"{wins}/{len(seeds)}",
                            "paired_gap_per_seed": {str(s): round(d, 5) for s, d in zip(seeds, paired)},
                            "paired_gap": _spread(paired)}
    if set(PAPER) <= set(test_mae):
        means = [test_mae[m]["mean"] for m in ("src", "non", "zo", "fo")]
        out["goals"] = {"ordering_src_non_zo_fo": means == sorted(means, reverse=True),
                        "zo_at_most_0.75_src": test_mae["zo"]["mean"] <= 0.75 * test_mae["src"]["mean"],
                        "gap_larger_than_spread": bool(out["zo_vs_non"]["gap"] > out["zo_vs_non"]["larger_std"])}
    return out


def table(summary: dict[str, Any]) -> str:
    names = {"src": "SRC", "non": "NON", "zo": "ZO-SOL", "fo": "FO-SOL (white-box)"}
    seeds = list(next(iter(summary["test_mae"].values()))["seeds"])
    head = "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | vs SRC | paper |"
    rows = [head, "|" + "---|" * (len(seeds) + 4)]
    for m, v in summary["test_mae"].items():
        rel = summary.get("vs_src_mean", {}).get(m)
        rows.append(f"| {names.get(m, m)} | " + " | ".join(f"{v['seeds'][s]:.4f}" for s in seeds)
                    + f" | **{v['mean']:.4f} ± {v['std']:.4f}** | {'-' if rel is None else f'{100 * rel:+.1f}%'} | "
                    f"{PAPER.get(m, '-')} |")
    return "\n".join(rows)


def plot(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"src": "SRC", "non": "NON", "zo": "ZO-SOL", "fo": "FO-SOL\n(white-box)"}
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, (m, v) in enumerate(summary["test_mae"].items()):
        ax.bar(i, v["mean"], yerr=v["std"], capsize=6, color="C%d" % i, alpha=0.6)
        ax.scatter([i] * len(v["seeds"]), list(v["seeds"].values()), color="k", s=14, zorder=3)
    ax.set_xticks(range(len(summary["test_mae"])), [names.get(m, m) for m in summary["test_mae"]])
    ax.set_ylabel("test MAE (held-out Re)")
    ax.set_title(f"ZO-SOL at CPU scale: mean ± std over {len(v['seeds'])} seeds (dots: each seed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run side by side (one process and torch thread each)")
    ap.add_argument("--run-dir", type=Path, default=Path("runs/sol-small"))
    ap.add_argument("--data-dir", type=Path, default=Path("runs/sol-data"))
    ap.add_argument("--out-json", type=Path)
    ap.add_argument("--methods", default="src,non,zo,fo")
    ap.add_argument("--plots", action="store_true", help="also draw each seed's vorticity and MAE plots")
    ap.add_argument("--one-seed", type=int, help=argparse.SUPPRESS)  # a worker of --jobs
    ap.add_argument("set", nargs="*", help="KEY=VALUE overrides of the preset (JSON values), e.g. steps=200")
    args = ap.parse_args()
    over = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}

    import torch

    torch.set_num_threads(1)
    if args.one_seed is not None:
        print(json.dumps(run_seed(args, args.one_seed, over)))
        return

    from bbzo.provenance import provenance
    from bbzo.tasks.sol import generate

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    prov = provenance()  # the code that runs: taken before the seeds start, not after
    t0 = time.perf_counter()
    s0, _ = _settings(args, seeds[0], over)
    data = generate(s0.data, s0.data_dir, progress=False)  # once, before the workers share the cache
    data_s = round(time.perf_counter() - t0, 1)
    per_seed: dict[int, dict[str, Any]] = {}
    if args.jobs <= 1:
        for s in seeds:
            per_seed[s] = run_seed(args, s, over)
            print(f"seed {s}: " + ", ".join(f"{m} {e['mae']:.4f}" for m, e in per_seed[s]["eval"].items()),
                  file=sys.stderr, flush=True)
    else:
        pending = list(seeds)
        running: dict[int, tuple[subprocess.Popen, Any]] = {}
        base = [sys.executable, __file__, "--preset", args.preset, "--run-dir", str(args.run_dir), "--data-dir",
                str(args.data_dir), "--methods", args.methods, *(["--plots"] if args.plots else []), *args.set]
        while pending or running:
            while pending and len(running) < args.jobs:
                s = pending.pop(0)
                log = (args.run_dir / f"seed{s}.log")
                log.parent.mkdir(parents=True, exist_ok=True)
                f = log.open("w")
                running[s] = (subprocess.Popen([*base, "--one-seed", str(s)], stdout=subprocess.PIPE, stderr=f,
                                               text=True), f)
            for s, (p, f) in list(running.items()):
                if p.poll() is not None:
                    out = p.stdout.read() if p.stdout else ""
                    f.close()
                    if p.returncode != 0:
                        sys.exit(f"seed {s} failed (exit {p.returncode}); see {args.run_dir / f'seed{s}.log'}")
                    per_seed[s] = json.loads(out.strip().splitlines()[-1])
                    print(f"seed {s}: " + ", ".join(f"{m} {e['mae']:.4f}" for m, e in per_seed[s]["eval"].items()),
                          file=sys.stderr, flush=True)
                    del running[s]
            time.sleep(1.0)
    summary = summarize(per_seed)
    first = per_seed[seeds[0]]
    result: dict[str, Any] = {
        "benchmark": "sol_small",
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "seeds": seeds,
        **summary,
        "train": {str(s): {m: {k: t.get(k) for k in ("steps", "queries", "score_queries", "queries_per_step",
                                                      "oracle_rows", "solver_state_steps", "wall_s", "final_train_loss")
                               if k in t} for m, t in r["train"].items()} for s, r in per_seed.items()},
        "seed_seconds": {str(s): r["seed_seconds"] for s, r in per_seed.items()},
        "data_seconds": data_s, "total_seconds": round(time.perf_counter() - t0, 1),
        "jobs": args.jobs, "config": {k: v for k, v in first["config"].items() if k != "seed"},
        "data_meta": data.meta, "paper_full_scale": PAPER, "provenance": prov,
    }
    result["table"] = table(summary)
    if args.out_json:
        result["plot"] = str(plot(summary, args.out_json.with_suffix(".png")))
    emit(result, args.out_json)


if __name__ == "__main__":
    main()
