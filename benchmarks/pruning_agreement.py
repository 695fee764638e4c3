"""How well does each pruning score agree with white-box FO-GraSP on ResNet-20 at init? (issue 3)

For every registered score: layer-wise kept fractions at the given sparsity (LPR), their MAE against
FO-GraSP's LPR divided by the MAE of uniform ratios (``layer_mae_ratio``: 1 = no better than uniform),
and the within-layer Spearman correlation of the *signed* score with FO-GraSP's signed score (mean over
layers; ~0 = no per-weight information), plus queries and seconds. Prints JSON; ``--out`` also writes
it, and ``--lpr-dir`` saves each LPR file (for ``benchmarks/lpr_training.py``).

    .venv/bin/python benchmarks/pruning_agreement.py --out benchmarks/results/pruning_agreement.json \
        --lpr-dir benchmarks/results/lpr

Setting (as ../shared/research/zo_grasp_check.md): ResNet-20 (Kaiming init, seed 0), train-mode BN,
mean cross-entropy, 250 real CIFAR-10 training images (25 per class), 90% sparsity, Conv/Linear weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from bbzo.models import create_model
from bbzo.provenance import provenance
from bbzo.sparsity import compute_score, ratios_from_scores, uniform_ratios
from bbzo.tasks.cifar import class_balanced_subset, load_image_classification

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10_subset.npz"


def scoring_batch(path: Path, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` training images of each class, normalised (DeepZero's scoring batch)."""
    if not path.is_file():
        sys.exit(f"error: {path} not found; pass --data path/to/cifar10_subset.npz (see ../shared/data/README.md)")
    x, y = load_image_classification(path, "train")
    idx = class_balanced_subset(y, per_class)
    return x[idx], y[idx]


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--per-class", type=int, default=25)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sketch-q", type=int, default=256)
    ap.add_argument("--scores", default="random,magnitude,layer_noise,snip,fo_grasp_t200,zo_grasp,zo_grasp_sketch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--lpr-dir", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    x, y = scoring_batch(args.data, args.per_class)
    torch.manual_seed(args.seed)
    model = create_model(args.model).train()

    def run(label: str):
        name, kw = label, {}
        if label == "fo_grasp_t200":
            name, kw = "fo_grasp", {"temperature": 200.0}
        elif label == "zo_grasp_sketch":
            kw = {"q": args.sketch_q}
        res = compute_score(name, model, ce, x, y, seed=args.seed, **kw)
        lpr = ratios_from_scores(res.scores, args.sparsity, res.keep, model=args.model, score=label,
                                 seed=args.seed, queries=res.queries, extra={**res.info, "seconds": round(res.seconds, 2)})
        print(f"{label:<18} queries {res.queries:>6}  {res.seconds:7.1f} s", file=sys.stderr, flush=True)
        return res, lpr

    ref, ref_lpr = run("fo_grasp")
    names = list(ref.scores)
    uni = uniform_ratios(ref_lpr.size, args.sparsity)
    ref_f = np.array([ref_lpr.kept_fraction[n] for n in names])
    mae_uniform = float(np.mean(np.abs(np.array([uni.kept_fraction[n] for n in names]) - ref_f)))

    rows = {}
    labels = ["fo_grasp"] + [s.strip() for s in args.scores.split(",") if s.strip()]
    for label in labels:
        res, lpr = (ref, ref_lpr) if label == "fo_grasp" else run(label)
        f = np.array([lpr.kept_fraction[n] for n in names])
        rho = [float(spearmanr(res.scores[n].flatten().numpy(), ref.scores[n].flatten().numpy()).correlation)
               for n in names]
        rows[label] = {
            "layer_mae_ratio": round(float(np.mean(np.abs(f - ref_f))) / mae_uniform, 4),
            "within_layer_spearman": round(float(np.nanmean(rho)), 4),
            "queries": res.queries,
            "seconds": round(res.seconds, 2),
            "query_only": label not in ("fo_grasp", "fo_grasp_t200", "snip"),
            "spearman_per_layer": {n: round(r, 3) for n, r in zip(names, rho)},
            "kept_fraction": {n: round(float(v), 4) for n, v in zip(names, f)},
            "options": res.info,
        }
        if args.lpr_dir is not None:
            lpr.save(args.lpr_dir / f"{args.model}_{label}_{args.sparsity:g}.json")
    if args.lpr_dir is not None:
        uni.model, uni.score = args.model, "uniform"
        uni.save(args.lpr_dir / f"{args.model}_uniform_{args.sparsity:g}.json")

    result = {
        "benchmark": "pruning_agreement",
        "command": "python " + " ".join(sys.argv),
        "model": args.model, "sparsity": args.sparsity, "seed": args.seed,
        "scoring_images": int(x.shape[0]), "data": str(args.data.name), "bn_mode": "train",
        "reference": "fo_grasp (T=1, |S| ranking)",
        "mae_uniform_vs_fo": round(mae_uniform, 4),
        "goals": {"zo_grasp layer_mae_ratio": "<= 0.5",
                  "improved (zo_grasp_sketch) within_layer_spearman": ">= 0.2 at <= 5000 queries"},
        "machine": {"threads": args.threads, "torch": torch.__version__, "python": platform.python_version()},
        "scores": rows,
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "provenance": provenance(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
