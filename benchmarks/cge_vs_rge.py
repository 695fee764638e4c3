"""DeepZero Fig. 2 at CPU scale: FO vs CGE vs RGE (q = d) training DeepZero's simple CNNs on real CIFAR-10. Prints JSON.

Every run is ``bbzo cifar train --preset fig2`` (DeepZero's simple-CNN family, no augmentation or weight decay, SGD
momentum 0.9, cosine over the run, batch 256, mu 5e-3, BN in train mode with per-query batch statistics) on the
CIFAR-10 subset (10k train / 2k test). All methods of a seed share the init and the minibatch order; RGE gets
q = d Gaussian directions (CGE's query count: d + 1 per step).

**Learning rates** are chosen per method by one short screen, the same for every method: each rate of ``--screen-lrs``
trains ``--screen-epochs`` epochs of the 730-parameter CNN (seed 0) on the training images minus ``--val-images``
held-out ones (class-balanced, the same for every run) and is scored by its accuracy on those held-out images; the
test images are never seen. Highest validation accuracy wins (ties: lower validation loss). The screen is part of
the JSON. ``--lr fo=...,cge=...,rge=...`` skips it (then the JSON says so).

**Runs survive interruption**: every (model, method, seed) trains in its own run folder under ``--work`` (the name
holds the lr and epochs). A finished run (``results.json``) is reused; an unfinished one resumes from its
checkpoint (every epoch); the JSON is assembled from the run folders, marked ``"complete": false`` with the list
of missing runs when some have not finished. ``--methods`` / ``--jobs-of I/N`` split the training among processes
that share ``--work`` (each run folder is locked by the run that trains it); ``--assemble`` only collects.

**What a shared 2-core CPU affords** (the defaults): the 730-parameter CNN with 3 seeds x 5 epochs and the
3,700-parameter CNN with 1 seed x 1 epoch of the 10k subset, a 1-epoch screen; the same epochs and data for every
method of a model. An RGE step at q = d is d + 1 full forwards (731 at 730 parameters, 3,701 at 3,700).

    python benchmarks/cge_vs_rge.py --out benchmarks/results/cge_vs_rge.json     # screen, runs, JSON, picture
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bbzo.config import resolve  # noqa: E402
from bbzo.errors import ConfigError  # noqa: E402
from bbzo.listeners import read_jsonl, save_figure  # noqa: E402
from bbzo.provenance import provenance  # noqa: E402
from bbzo.run import run_task  # noqa: E402
from bbzo.signals import Interrupted  # noqa: E402
from bbzo.tasks.cifar import TASK, CifarSettings  # noqa: E402
from common import emit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: The shared CIFAR-10 subset: ``shared/data/cifar10_subset.npz`` in the folder holding the checkout (``../shared``) or
#: in a folder above it (a worktree nested deeper), the first that exists.
DATA_NAME = Path("shared") / "data" / "cifar10_subset.npz"
DEFAULT_DATA = next((p / DATA_NAME for p in ROOT.parents if (p / DATA_NAME).exists()), ROOT.parent / DATA_NAME)
PAPER = {"simple_cnn_730": {"fo": 42.09, "cge": 41.65, "rge": 37.53},
         "simple_cnn_3700": {"fo": 60.47, "cge": 59.66, "rge": 50.06},
         "simple_cnn_6670": {"fo": 70.69, "cge": 70.04, "rge": 65.31}}
METHODS = ("fo", "cge", "rge")
SCREEN_MODEL = "simple_cnn_730"
#: What a shared 2-core CPU affords (see docs/results/fig2.md): RGE at q = d costs d + 1 full forwards per step.
DEFAULT_RUNS = ("simple_cnn_730:0,1,2:5", "simple_cnn_3700:0:1")
SCREEN_SEED = 0


def data_path(arg: Optional[str]) -> Path:
    """``--data``, or the shared subset; a clear error when it is missing."""
    path = Path(arg) if arg else DEFAULT_DATA
    if not path.exists():
        where = f"at {path}" if arg else f"as {DATA_NAME} in any folder above {ROOT}"
        raise SystemExit(f"error: CIFAR-10 data not found {where}. Pass --data PATH (an .npz with train_x/train_y/"
                         "test_x/test_y, or a cifar-10-batches-py folder); bbzo never downloads data.")
    return path


def parse_runs(specs: list[str]) -> list[tuple[str, list[int], int]]:
    """``MODEL:SEEDS:EPOCHS`` (``simple_cnn_730:0,1,2:20``) -> ``[(model, seeds, epochs)]``."""
    out = []
    for spec in specs:
        parts = spec.split(":")
        if len(parts) != 3:
            raise SystemExit(f"error: --runs {spec!r}: give MODEL:SEEDS:EPOCHS, e.g. simple_cnn_730:0,1,2:20.")
        try:
            out.append((parts[0], [int(s) for s in parts[1].split(",")], int(parts[2])))
        except ValueError:
            raise SystemExit(f"error: --runs {spec!r}: seeds and epochs must be integers.") from None
    return out


class Runs:
    """Where each run lives, whether it is finished, and how to train or continue it."""

    def __init__(self, args: argparse.Namespace, data: Path) -> None:
        self.args, self.data, self.work = args, data, Path(args.work)

    def folder(self, tag: str, model: str, method: str, seed: int, lr: float, epochs: int) -> Path:
        return self.work / tag / model / f"{method}-lr{lr:g}-ep{epochs}-seed{seed}"

    @staticmethod
    def done(folder: Path) -> bool:
        path = folder / "results.json"
        try:
            return json.loads(path.read_text()).get("status") == "done"
        except (OSError, ValueError):
            return False

    def train(self, folder: Path, model: str, method: str, seed: int, lr: float, epochs: int, val: int) -> None:
        """Train (or continue) one run into ``folder``; nothing when it is finished."""
        if self.done(folder):
            return
        ckpt = folder / method / "checkpoint.pt"
        resume = ckpt.exists()
        values = {"preset": "fig2", "data": self.data, "model": model, "method": (method,), "lr": f"{lr:g}",
                  "seed": seed, "epochs": epochs, "batch": self.args.batch, "subset": 0, "val_images": val,
                  "out": folder, "no_progress": not self.args.progress, "no_plots": True, "resume": resume,
                  "overwrite": not resume and folder.exists(), "device": "cpu"}
        if self.args.checkpoint_every:
            values["checkpoint_every"] = self.args.checkpoint_every
        s, src = resolve(CifarSettings, values)
        what = f"{model} {method} lr {lr:g} seed {seed} ({epochs} epochs{', validation' if val else ''})"
        print(f"[{'resume' if resume else 'train'}] {what} -> {folder}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        run_task(TASK, s, src, command=f"benchmarks/cge_vs_rge.py: {what}")
        print(f"[done] {what} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    @staticmethod
    def read(folder: Path, method: str) -> dict[str, Any]:
        """A finished run: per-epoch evaluation accuracy and loss, final numbers, cost."""
        res = json.loads((folder / "results.json").read_text())["results"][0]
        rows = read_jsonl(folder / method / "metrics.jsonl")
        evals = {}
        for r in rows:
            if "eval_test_acc" in r:
                evals[int(r["step"])] = r  # the last row of a step wins (a resumed run rewrites none, but be safe)
        spe = res["steps"] / max(res["epochs"], 1e-9) if res.get("epochs") else None
        spe = int(round(spe)) if spe else next(iter(rows), {}).get("epoch_steps")
        curve = [{"epoch": round(step / spe, 3), "step": step, "acc": evals[step]["eval_test_acc"],
                  "loss": evals[step].get("eval_test_loss")} for step in sorted(evals)]
        return {"acc": res["test_acc"], "acc_before": res["test_acc_before"], "train_loss": res["final_train_loss"],
                "eval_loss": res["test_loss"], "queries_per_step": res["queries_per_step"], "steps": res["steps"],
                "steps_per_epoch": spe, "wall_s": res["wall_s"],
                "train_s_per_epoch": res.get("train_s_per_epoch", res.get("wall_s_per_epoch")),  # runs cached before the rename
                "curve": curve}


# ---------------------------------------------------------------------------- the screen
def screen(args: argparse.Namespace, runs: Runs, train: bool) -> dict[str, Any]:
    """Every method at every rate of the grid on the validation split; the chosen rate per method."""
    lrs = [float(v) for v in args.screen_lrs.split(",")]
    table: dict[str, Any] = {}
    chosen: dict[str, float] = {}
    missing = []
    for method in args.methods:
        rows = []
        for lr in lrs:
            folder = runs.folder("screen", SCREEN_MODEL, method, SCREEN_SEED, lr, args.screen_epochs)
            if train and _mine(args, ("screen", method, lr)):
                runs.train(folder, SCREEN_MODEL, method, SCREEN_SEED, lr, args.screen_epochs, args.val_images)
            if not runs.done(folder):
                missing.append(f"screen {method} lr {lr:g}")
                continue
            r = runs.read(folder, method)
            rows.append({"lr": lr, "val_acc": r["acc"], "val_loss": r["eval_loss"], "train_loss": r["train_loss"],
                         "curve": [(c["epoch"], c["acc"]) for c in r["curve"]], "folder": str(folder)})
        table[method] = rows
        ok = [r for r in rows if r["val_loss"] is not None and math.isfinite(r["val_loss"])]
        if len(rows) == len(lrs) and ok:
            best = max(ok, key=lambda r: (r["val_acc"], -r["val_loss"]))
            chosen[method] = best["lr"]
    return {"model": SCREEN_MODEL, "seed": SCREEN_SEED, "epochs": args.screen_epochs, "val_images": args.val_images,
            "lrs": lrs, "criterion": "highest validation accuracy at the end of the screen (ties: lower validation loss)",
            "results": table, "chosen": chosen, "missing": missing}


def _mine(args: argparse.Namespace, key: tuple) -> bool:
    """Whether this process trains ``key``: ``--jobs-of I/N`` deals the runs round-robin in the order they are met
    (the same order in every process given the same arguments)."""
    if not args.jobs_of:
        return True
    i, n = (int(v) for v in args.jobs_of.split("/"))
    if not 1 <= i <= n:
        raise SystemExit(f"error: --jobs-of {args.jobs_of}: I counts from 1 to N (e.g. 1/2 and 2/2).")
    args.dealt = getattr(args, "dealt", -1) + 1
    return args.dealt % n == i - 1


# ---------------------------------------------------------------------------- the JSON
def _stats(vals: list[float]) -> dict[str, Any]:
    return {"mean": round(statistics.mean(vals), 2), "std": round(statistics.stdev(vals), 2) if len(vals) > 1 else None,
            "min": round(min(vals), 2), "max": round(max(vals), 2), "n": len(vals)}


def summarize(per: dict[str, dict[int, dict[str, Any]]], seeds: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m, by_seed in per.items():
        if by_seed:
            out[m] = _stats([by_seed[s]["acc"] for s in sorted(by_seed)])
    full = [s for s in seeds if all(s in per.get(m, {}) for m in METHODS)]
    if full:
        acc = {m: [per[m][s]["acc"] for s in full] for m in METHODS}
        gap = lambda a, b: [round(x - y, 2) for x, y in zip(acc[a], acc[b])]  # noqa: E731
        out["paired_seeds"] = full
        out["cge_minus_fo"] = {"by_seed": gap("cge", "fo"), **_stats(gap("cge", "fo"))}
        out["cge_minus_rge"] = {"by_seed": gap("cge", "rge"), **_stats(gap("cge", "rge"))}
        spread = max(max(acc[m]) - min(acc[m]) for m in ("cge", "rge"))
        out["seed_spread"] = round(spread, 2) if len(full) > 1 else None  # one seed has no spread
        cge_rge = out["cge_minus_rge"]
        out["goal"] = {"cge_within_1.5_of_fo": statistics.mean(acc["fo"]) - statistics.mean(acc["cge"]) <= 1.5,
                       "cge_above_rge_beyond_seed_spread": statistics.mean(acc["cge"]) - statistics.mean(acc["rge"]) > spread
                       if len(full) > 1 else None,
                       "cge_above_rge_every_seed": cge_rge["min"] > 0,
                       "paper_order_fo_cge_rge": statistics.mean(acc["fo"]) >= statistics.mean(acc["cge"])
                       > statistics.mean(acc["rge"])}
    return out


def plot(models: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in models if any(models[m]["runs"][k] for k in METHODS)]
    if not names:
        return
    fig, axes = plt.subplots(2, len(names), figsize=(5.6 * len(names), 8), squeeze=False)
    colors = {"fo": "tab:gray", "cge": "tab:blue", "rge": "tab:orange"}
    for col, model in enumerate(names):
        info = models[model]
        for m in METHODS:
            runs = list(info["runs"][m].values())
            if not runs:
                continue
            n = min(len(r["curve"]) for r in runs)
            ep = [0.0] + [c["epoch"] for c in runs[0]["curve"][:n]]
            curves = [[r["acc_before"]] + [c["acc"] for c in r["curve"][:n]] for r in runs]
            mean = [statistics.mean(v) for v in zip(*curves)]
            lo, hi = [min(v) for v in zip(*curves)], [max(v) for v in zip(*curves)]
            label = f"{m.upper()} (lr {info['lr'][m]:g}) {info['summary'][m]['mean']:.1f}%"
            if len(runs) > 1:
                label += f" ± {info['summary'][m]['std']:.1f} ({len(runs)} seeds)"
            for ax, x in ((axes[0][col], ep), (axes[1][col], [e * runs[0]["steps_per_epoch"] * runs[0]["queries_per_step"]
                                                             for e in ep])):
                if m == "fo" and ax is axes[1][col]:
                    ax.axhline(mean[-1], color=colors[m], ls="--", lw=1, label=f"FO final (autograd, no queries) {mean[-1]:.1f}%")
                    continue
                ax.plot(x, mean, color=colors[m], label=label)
                if len(runs) > 1:
                    ax.fill_between(x, lo, hi, color=colors[m], alpha=0.2)
            if model in PAPER:
                axes[0][col].axhline(PAPER[model][m], color=colors[m], ls=":", lw=1)
        axes[0][col].set_title(f"{model}: test accuracy (band: min-max over seeds; dotted: paper, 50 epochs of 50k)",
                               fontsize=8)
        axes[0][col].set_xlabel("epoch")
        axes[1][col].set_xlabel("loss queries")
        for ax in axes[:, col]:
            ax.set_ylabel("test accuracy [%]")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_screen(scr: dict[str, Any], path: Path) -> bool:
    """Validation accuracy against the learning rate, one line per method, the chosen rates marked."""
    rows = scr.get("results") or {}
    if not any(rows.values()):
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    colors = {"fo": "tab:gray", "cge": "tab:blue", "rge": "tab:orange"}
    for m, rs in rows.items():
        if not rs:
            continue
        line, = ax.plot([r["lr"] for r in rs], [r["val_acc"] for r in rs], "o-", color=colors.get(m), label=m.upper())
        if m in scr["chosen"]:
            best = next(r for r in rs if r["lr"] == scr["chosen"][m])
            ax.plot([best["lr"]], [best["val_acc"]], "*", ms=14, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation accuracy [%]")
    ax.set_title(f"screen: {scr['model']}, {scr['epochs']} epoch(s), {scr['val_images']} held-out training images "
                 "(star: chosen)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help=f"CIFAR-10 (.npz or cifar-10-batches-py); default: {DATA_NAME} in the first folder "
                                   "above the checkout that has it")
    ap.add_argument("--runs", action="append", default=None,
                    help="MODEL:SEEDS:EPOCHS, repeatable (default simple_cnn_730:0,1,2:5 and simple_cnn_3700:0:1)")
    ap.add_argument("--methods", default="fo,cge,rge")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", help="fo=..,cge=..,rge=..: skip the screen and use these rates")
    ap.add_argument("--screen-lrs", default="0.05,0.1,0.2,0.5,1.0")
    ap.add_argument("--screen-epochs", type=int, default=1)
    ap.add_argument("--val-images", type=int, default=2000, help="held-out training images the screen scores on")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (1: run processes side by side)")
    ap.add_argument("--work", default="runs/cge_vs_rge", help="run folders (the cache)")
    ap.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: the fig2 preset's, an epoch)")
    ap.add_argument("--jobs-of", help="I/N (I = 1..N): train only this process's share of the runs (N processes share --work)")
    ap.add_argument("--assemble", action="store_true", help="train nothing; assemble the JSON from finished runs")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    if any(m not in METHODS for m in args.methods):
        raise SystemExit(f"error: --methods: choose from {', '.join(METHODS)}.")
    torch.set_num_threads(args.threads)
    data = data_path(args.data)
    plan = parse_runs(args.runs or list(DEFAULT_RUNS))
    runs = Runs(args, data)
    train = not args.assemble
    t0 = time.perf_counter()
    try:
        if args.lr:
            rates = {k: float(v) for k, v in (p.split("=") for p in args.lr.split(","))}
            scr: dict[str, Any] = {"skipped": f"--lr {args.lr}", "chosen": rates, "missing": []}
        else:
            scr = screen(args, runs, train)
        lrs = scr["chosen"]
        models: dict[str, Any] = {}
        missing = list(scr["missing"])
        for model, seeds, epochs in plan:
            per: dict[str, dict[int, Any]] = {m: {} for m in METHODS}
            for m in args.methods:
                if m not in lrs:
                    missing += [f"{model} {m} seed {s} (no learning rate: the screen is unfinished)" for s in seeds]
                    continue
                for s in seeds:
                    folder = runs.folder("main", model, m, s, lrs[m], epochs)
                    if train and _mine(args, ("main", model, m, s)):
                        runs.train(folder, model, m, s, lrs[m], epochs, 0)
                    if runs.done(folder):
                        per[m][s] = {"folder": str(folder), **runs.read(folder, m)}
                    else:
                        missing.append(f"{model} {m} seed {s}")
            models[model] = {"seeds": seeds, "epochs": epochs, "lr": {m: lrs.get(m) for m in METHODS},
                             "summary": summarize(per, seeds),
                             "runs": {m: {str(s): r for s, r in per[m].items()} for m in METHODS},
                             "paper": PAPER.get(model)}
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    except Interrupted as e:  # a signal or Ctrl-C: the run saved its last step; the same command continues it
        said = str(e).split("; continue with:")[0].rstrip(".")
        print(f"interrupted: {said}. Rerun the same command to continue: finished runs are reused and this one "
              "resumes from its checkpoint.", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    spe = next((r["steps_per_epoch"] for mm in models.values() for m in METHODS for r in mm["runs"][m].values()), None)
    result = {
        "benchmark": "cge_vs_rge", "complete": not missing, "missing": missing,
        "models": models, "screen": scr,
        "protocol": {"preset": "fig2", "data": str(data), "batch": args.batch, "steps_per_epoch": spe,
                     "optimizer": "SGD momentum 0.9, no weight decay, cosine over the run, no warm-up",
                     "mu": 5e-3, "rge": "q = d Gaussian directions, forward differences (d + 1 queries per step)",
                     "cge": "every coordinate, forward differences (d + 1 queries per step)",
                     "fo": "autograd (white-box reference, no queries)", "augment": False,
                     "bn": "train mode, each query with its own batch statistics; one unperturbed forward per step "
                           "updates the running statistics; accuracy in eval mode",
                     "same_for_every_method": "init, minibatch order, optimizer, epochs, data",
                     "threads_per_process": args.threads},
        "goal": "CGE within 1.5 points of FO, and above RGE by more than the seed spread (largest min-max range of "
                "CGE or RGE over seeds), on the 730-parameter CNN; the larger CNN in the same order",
        "wall_s": round(time.perf_counter() - t0, 1),
        "command": " ".join(["python", "benchmarks/cge_vs_rge.py", *sys.argv[1:]]), **provenance(),
    }
    if args.out:
        png = Path(args.out).with_suffix(".png")
        png.parent.mkdir(parents=True, exist_ok=True)
        plot(models, png)
        result["plot"] = str(png)
        screen_png = png.with_name(png.stem + "_screen.png")
        if plot_screen(scr, screen_png):
            result["screen_plot"] = str(screen_png)
    emit(result, args.out)


if __name__ == "__main__":
    main()
