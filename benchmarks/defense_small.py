"""Certified black-box defense at CPU scale on real images (DeepZero Table 2, shrunk to fit 2 cores).

Every stage is the code behind ``bbzo defense ...``, on ../shared/data/imagenette_32px.npz (10 ImageNet
classes at 32 px: 9,469 train / 3,925 val), sigma 0.25:

1. the black box: a classifier this script trains on the clean images (first-order; the *owner's* training).
   Default timm ``resnet10t``: ResNet-50 costs 3.7 ms per 32 px image here and the ZO fine-tuning needs
   ~10^6 classifier queries, so the smaller timm ResNet keeps the whole benchmark under an hour;
2. ``bbzo defense pretrain``: a DnCNN (depth 6, width 32 here; 17 x 64 in the paper) on MSE;
3. ``bbzo defense finetune --method zo,fo,zo-ds``: DeepZero (Sparse-CGE on 2/3 of the last conv's
   weights per step, the paper's 1,152 / 1,728), FO-DS (white-box, the upper reference), ZO-DS (q = 192);
4. ``bbzo defense certify``: CERTIFY (n0, n, alpha 0.001) on a class-balanced subset of the val images for
   none / mse / zo / fo / zo-ds.

Stages are cached in ``--work`` (rerunning the script reuses what finished). Writes the JSON with
``certified_accuracy`` (method -> radius -> %), the 95% Clopper-Pearson interval of each accuracy at r = 0,
an exact paired (McNemar) test at r = 0 between methods on the same images, the settings, the wall time per stage
(stages reused from ``--work`` report the commit they ran at in ``stage_commits``) and the command:

    python benchmarks/defense_small.py --out benchmarks/results/defense_small.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from scipy.stats import binomtest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bbzo.config import resolve  # noqa: E402
from bbzo.oracles.classifier import IMAGENET_MEAN, IMAGENET_STD, build_classifier, load_classifier  # noqa: E402
from bbzo.provenance import provenance  # noqa: E402
from bbzo.run import run_task  # noqa: E402
from bbzo.tasks.defense import (CERTIFY, FINETUNE, PAPER_TABLE2, PRETRAIN, CertifySettings, FinetuneSettings,  # noqa: E402
                                PretrainSettings, accuracy_interval, load_images, make_oracle)
from bbzo.tasks.defense.classifier import clean_accuracy, train_classifier  # noqa: E402
from common import emit  # noqa: E402

ROOT = Path(__file__).resolve().parent
DEFAULT_DATA = ROOT.parents[1] / "shared" / "data" / "imagenette_32px.npz"


def _done(folder: Path) -> bool:
    p = folder / "results.json"
    return p.exists() and json.loads(p.read_text()).get("status") == "done"


def _stage(task: Any, cls: type, values: dict[str, Any], out: Path, label: str, timings: dict[str, float],
           progress: bool) -> dict[str, Any]:
    if _done(out):
        print(f"[reuse] {out}", file=sys.stderr, flush=True)
    else:
        s, src = resolve(cls, {**values, "out": out, "no_progress": not progress, "overwrite": True})
        t0 = time.perf_counter()
        run_task(task, s, src, command=f"benchmarks/defense_small.py ({label})")
        timings[label] = round(time.perf_counter() - t0, 1)
        print(f"[done] {label} in {timings[label]:.0f} s", file=sys.stderr, flush=True)
    return json.loads((out / "results.json").read_text())


def _paired(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> dict[str, Any]:
    """Exact McNemar test at r = 0 on the same images: who is right where the other is wrong."""
    a = {r["idx"]: r["correct"] for r in first}
    b = {r["idx"]: r["correct"] for r in second}
    only_a = sum(1 for i in a if a[i] and not b[i])
    only_b = sum(1 for i in a if b[i] and not a[i])
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"only_first_correct": only_a, "only_second_correct": only_b, "p_two_sided": round(float(p), 6)}


def _commit(folder: Path) -> Any:
    run = folder / "run.json"
    return json.loads(run.read_text()).get("provenance", {}).get("commit") if run.exists() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=Path("runs/defense_small"))
    ap.add_argument("--classifier", default="timm:resnet10t")
    ap.add_argument("--clf-epochs", type=int, default=15)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--pretrain-epochs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60, help="fine-tuning steps of every method")
    ap.add_argument("--batch", type=int, default=16, help="fine-tuning images per step")
    ap.add_argument("--lr", type=float, default=1e-3, help="zo's Adam rate on the last conv (paper: 1e-5 for 20 epochs)")
    ap.add_argument("--full-lr", type=float, default=1e-4, help="Adam rate of fo and zo-ds, which move every denoiser weight")
    ap.add_argument("--budget", type=int, default=576, help="zo coordinates per step (2/3 of the last conv, as 1,152/1,728)")
    ap.add_argument("--methods", default="zo,fo,zo-ds")
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--certify-images", type=int, default=150, help="class-balanced val subset to certify")
    ap.add_argument("--certify-methods", default="", help="denoisers to certify (default: mse and every --methods)")
    ap.add_argument("--certify-name", default="certify", help="folder in --work for this certification")
    ap.add_argument("--eval-images", type=int, default=500, help="val subset for the noisy accuracy during fine-tuning")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t_all = time.perf_counter()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    # 1. the black box (its owner's first-order training)
    weights = work / "classifier.pt"
    data = load_images(args.data, 0, 0, args.seed)
    if not weights.exists():
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        net = build_classifier(args.classifier, data.num_classes)
        train_classifier(net, data.train_x, data.train_y, epochs=args.clf_epochs, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         seed=args.seed, device=args.device,
                         progress=lambda e, l: print(f"[classifier] epoch {e + 1}: loss {l:.3f}", file=sys.stderr, flush=True))
        tmp = weights.with_suffix(".tmp")
        torch.save(net.state_dict(), tmp)
        tmp.replace(weights)
        timings["classifier"] = round(time.perf_counter() - t0, 1)
    net = load_classifier(args.classifier, weights, data.num_classes)
    common = {"data": args.data, "classifier": args.classifier, "weights": weights, "num_classes": data.num_classes,
              "sigma": args.sigma, "depth": args.depth, "width": args.width, "seed": args.seed, "device": args.device}
    oracle = make_oracle(resolve(CertifySettings, common)[0], net=net)
    clean_acc = clean_accuracy(oracle.query, data.test_x, data.test_y)

    # 2-4. the defense commands
    pre = _stage(PRETRAIN, PretrainSettings, {**common, "epochs": args.pretrain_epochs, "batch": 64, "lr": 1e-3,
                                              "lr_step_epochs": 0.0, "test_subset": args.eval_images},
                 work / "pretrain", "pretrain", timings, args.progress)
    methods = tuple(args.methods.split(","))
    ft = _stage(FINETUNE, FinetuneSettings, {**common, "denoiser": work / "pretrain" / "model.pt", "method": methods,
                                             "steps": args.steps, "batch": args.batch, "lr": args.lr,
                                             "method_lr": {"fo": args.full_lr, "zo-ds": args.full_lr},
                                             "lr_step_epochs": 0.0, "budget": args.budget,
                                             "test_subset": args.eval_images, "eval_every": max(1, args.steps // 4),
                                             "checkpoint_every": 10},
                work / "finetune", "finetune", timings, args.progress)
    denoisers = {"mse": str(work / "pretrain" / "model.pt"),
                 **{m: str(work / "finetune" / m / "model.pt") for m in methods}}
    if args.certify_methods:
        denoisers = {m: denoisers[m] for m in args.certify_methods.split(",")}
    cert = _stage(CERTIFY, CertifySettings, {**common, "denoisers": denoisers, "n0": args.n0, "n": args.n,
                                             "test_subset": args.certify_images, "batch": 550},
                  work / args.certify_name, "certify", timings, args.progress)

    per_image = json.loads((work / args.certify_name / "per_image.json").read_text())
    acc = cert["certified_accuracy"]
    count = cert["images"]
    ci = {m: accuracy_interval(a["0"], count) for m, a in acc.items()}
    checks: dict[str, Any] = {}
    if "zo" in acc and "mse" in acc:
        checks["zo_minus_mse_r0"] = round(acc["zo"]["0"] - acc["mse"]["0"], 2)
        checks["zo_above_mse_beyond_ci"] = ci["zo"][0] > ci["mse"][1] or acc["zo"]["0"] > ci["mse"][1]
    paired = {f"{a}_vs_{b}": _paired(per_image[a], per_image[b]) for a, b in (("zo", "mse"), ("fo", "zo"), ("zo-ds", "mse"))
              if a in per_image and b in per_image}
    if "zo_vs_mse" in paired:
        checks["zo_above_mse_paired_p_below_0.05"] = paired["zo_vs_mse"]["p_two_sided"] < 0.05 and \
            paired["zo_vs_mse"]["only_first_correct"] > paired["zo_vs_mse"]["only_second_correct"]
    if "zo" in acc and "fo" in acc:
        checks["fo_minus_zo_r0"] = round(acc["fo"]["0"] - acc["zo"]["0"], 2)
        checks["zo_within_4_of_fo_r0"] = acc["fo"]["0"] - acc["zo"]["0"] <= 4.0
    result = {
        "benchmark": "defense_small",
        "certified_accuracy": acc,
        "ci95_r0": ci,
        "paired_r0": paired,
        "images_certified": count,
        "max_certifiable_radius": cert["max_certifiable_radius"],
        "goal_checks": checks,
        "classifier": {"arch": args.classifier, "trained_epochs": args.clf_epochs, "clean_val_acc": clean_acc,
                       "val_images": int(data.test_x.shape[0])},
        "denoiser": {"arch": f"DnCNN depth {args.depth} width {args.width}", "pretrain": pre["results"]},
        "finetune": ft["results"],
        "certify": {k: cert[k] for k in ("abstain", "seconds_per_image", "classifier_queries")},
        "paper_table2": PAPER_TABLE2,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "wall_s": {**timings, "total": round(time.perf_counter() - t_all, 1)},
        "stage_commits": {name: _commit(work / name) for name in ("pretrain", "finetune", args.certify_name)},
        "command": " ".join(["python", *sys.argv]),
        **provenance(),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
