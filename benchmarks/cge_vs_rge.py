"""DeepZero Fig. 2 at CPU scale: FO vs CGE vs RGE (q = d) training DeepZero's simple CNNs on real CIFAR-10.

Every run is ``bbzo cifar train --preset fig2`` (the 730-parameter CNN family, no augmentation or weight
decay, SGD momentum 0.9, cosine over the run, batch 256, mu 5e-3, BN in train mode with per-query batch
statistics), on ../shared/data/cifar10_subset.npz (10k train / 2k test), for each model x method x seed.
All methods of a seed share the init and the batch order; RGE gets q = d directions (CGE's query count).

Learning rates: ``--lr`` per method (default the authors', DeepZero issue #1: CGE 1e-3, RGE 1e-4; FO
takes CGE's); ``--tuned-lr X`` adds a second set of runs with X for every method, to say whether a tuned
rate applied equally changes the ranking. Runs live in ``--work`` and resume when the script is rerun.

    python benchmarks/cge_vs_rge.py --models simple_cnn_730 --seeds 0,1,2 --epochs 20 \\
        --out benchmarks/results/cge_vs_rge.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bbzo.config import resolve  # noqa: E402
from bbzo.listeners import read_jsonl, save_figure  # noqa: E402
from bbzo.provenance import provenance  # noqa: E402
from bbzo.run import run_task  # noqa: E402
from bbzo.tasks.cifar import TASK, CifarSettings  # noqa: E402
from common import emit  # noqa: E402

ROOT = Path(__file__).resolve().parent
DEFAULT_DATA = ROOT.parents[1] / "shared" / "data" / "cifar10_subset.npz"
PAPER = {"simple_cnn_730": {"fo": 42.09, "cge": 41.65, "rge": 37.53},
         "simple_cnn_3700": {"fo": 60.47, "cge": 59.66, "rge": 50.06},
         "simple_cnn_6670": {"fo": 70.69, "cge": 70.04, "rge": 65.31}}
METHODS = ("fo", "cge", "rge")


def one_run(args: argparse.Namespace, model: str, method: str, seed: int, lr: float, tag: str) -> dict[str, Any]:
    out = Path(args.work) / tag / model / f"{method}-seed{seed}"
    done = out / "results.json"
    if done.exists() and json.loads(done.read_text()).get("status") == "done":
        print(f"[reuse] {out}", file=sys.stderr, flush=True)
    else:
        resume = (out / method / "checkpoint.pt").exists()
        s, src = resolve(CifarSettings, {"preset": "fig2", "data": args.data, "model": model, "method": (method,),
                                         "lr": lr, "seed": seed, "epochs": args.epochs, "batch": args.batch,
                                         "subset": args.subset, "out": out, "no_progress": not args.progress,
                                         "resume": resume, "device": args.device})
        t0 = time.perf_counter()
        run_task(TASK, s, src, command=f"benchmarks/cge_vs_rge.py ({model}, {method}, seed {seed}, lr {lr})")
        print(f"[done] {out} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    res = json.loads(done.read_text())["results"][0]
    curve = [(r["step"] / r["epoch_steps"], r["eval_test_acc"]) for r in read_jsonl(out / method / "metrics.jsonl")
             if "eval_test_acc" in r]
    return {"test_acc": res["test_acc"], "wall_s_per_epoch": res.get("train_s_per_epoch", res.get("wall_s_per_epoch")), "train_loss": res["final_train_loss"],
            "queries_per_step": res["queries_per_step"], "steps": res["steps"], "curve": curve}


def summarize(runs: dict[str, list[dict[str, Any]]], seeds: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m, rs in runs.items():
        acc = [r["test_acc"] for r in rs]
        out[f"{m}_acc"] = {"mean": round(statistics.mean(acc), 2), "sd": round(statistics.stdev(acc), 2) if len(acc) > 1 else None,
                           "range": round(max(acc) - min(acc), 2), "seeds": acc}
        out[f"{m}_wall_s_per_epoch"] = round(statistics.median(r["wall_s_per_epoch"] for r in rs), 2)
        out[f"{m}_train_loss"] = [round(r["train_loss"], 4) for r in rs]
        out[f"{m}_queries_per_step"] = rs[0]["queries_per_step"]
    if {"fo", "cge", "rge"} <= set(runs):
        fo, cge, rge = (out[f"{m}_acc"] for m in ("fo", "cge", "rge"))
        paired = [round(c - f, 2) for c, f in zip(cge["seeds"], fo["seeds"])]
        spread = max(cge["range"], rge["range"])
        out["cge_minus_fo"] = {"mean": round(cge["mean"] - fo["mean"], 2), "paired_by_seed": paired}
        out["cge_minus_rge"] = round(cge["mean"] - rge["mean"], 2)
        out["seed_spread"] = spread
        out["goal_met"] = bool(fo["mean"] - cge["mean"] <= 1.5 and cge["mean"] - rge["mean"] > spread)
    out["seeds"] = seeds
    return out


def plot(result: dict[str, Any], curves: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for m in METHODS:
            if m not in curves[model]:
                continue
            cs = curves[model][m]
            ep = [e for e, _ in cs[0]]
            mean = [statistics.mean(c[i][1] for c in cs) for i in range(len(ep))]
            lo = [min(c[i][1] for c in cs) for i in range(len(ep))]
            hi = [max(c[i][1] for c in cs) for i in range(len(ep))]
            line, = ax.plot(ep, mean, label=f"{m.upper()} {result['models'][model][m + '_acc']['mean']:.1f}%")
            ax.fill_between(ep, lo, hi, color=line.get_color(), alpha=0.2)
            if model in PAPER:
                ax.axhline(PAPER[model][m], color=line.get_color(), ls=":", lw=1)
        ax.set_title(f"{model}: test accuracy (band: seeds; dotted: paper, 50 epochs)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy [%]")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--models", default="simple_cnn_730,simple_cnn_3700")
    ap.add_argument("--methods", default="fo,cge,rge")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--subset", type=int, default=0, help="train images (0: all of --data's)")
    ap.add_argument("--lr", default="fo=1e-3,cge=1e-3,rge=1e-4", help="per-method learning rates (the authors')")
    ap.add_argument("--tuned-lr", type=float, help="also run every method at this rate")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default="runs/cge_vs_rge")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models, methods = args.models.split(","), args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = {k: float(v) for k, v in (p.split("=") for p in args.lr.split(","))}
    sets = {"authors": lrs}
    if args.tuned_lr:
        sets[f"tuned_{args.tuned_lr:g}"] = {m: args.tuned_lr for m in methods}
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    for tag, rates in sets.items():
        results[tag], curves[tag] = {}, {}
        for model in models:
            runs = {m: [one_run(args, model, m, s, rates[m], tag) for s in seeds] for m in methods}
            results[tag][model] = summarize(runs, seeds)
            curves[tag][model] = {m: [r["curve"] for r in rs] for m, rs in runs.items()}
    main_tag = next(iter(sets))
    result = {"benchmark": "cge_vs_rge", "models": results[main_tag],
              "lr": sets[main_tag], "other_lr_sets": {t: {"lr": sets[t], "models": results[t]} for t in sets if t != main_tag},
              "paper": {m: PAPER[m] for m in models if m in PAPER},
              "settings": {"preset": "fig2", "epochs": args.epochs, "batch": args.batch, "data": str(args.data),
                           "subset": args.subset, "optimizer": "sgd momentum 0.9, no weight decay, cosine, no warm-up",
                           "mu": 5e-3, "rge_q": "d", "augment": False, "threads": args.threads, "device": args.device},
              "goal": "CGE within 1.5 points of FO and above RGE by more than the seed spread (max range over seeds)",
              "wall_s": round(time.perf_counter() - t0, 1), "command": " ".join(["python", *sys.argv]), **provenance()}
    if args.out:
        png = Path(args.out).with_suffix(".png")
        plot(result, curves[main_tag], png)
        result["plot"] = str(png)
    emit(result, args.out)


if __name__ == "__main__":
    main()
