"""What feature reuse buys the defense's ZO step: the last conv is linear in its weights (DeepZero App. G).

One Sparse-CGE step on ``--coords`` random weights of the last conv of a DnCNN in front of a query-only
classifier, timed three ways side by side in one run, with the same probes:

* ``reuse``    -- bbzo's staged adapter (the default): the 16-layer body runs once, each perturbed image is the
  cached output plus one gathered plane (``linear_delta``); per query only the classifier runs;
* ``no_reuse`` -- ``feature_reuse=False``: every query runs the whole denoiser (batched with ``vmap``);
* ``naive``    -- perturb one weight in place, full forward, restore (one Python forward per coordinate).

Prints and writes JSON (seconds per step, ratios, max |difference| of the gradients to ``naive``):

    python benchmarks/defense_reuse.py --out benchmarks/results/defense_reuse_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bbzo  # noqa: E402
import bbzo.adapters  # noqa: E402
from bbzo.estimators import masked  # noqa: E402
from bbzo.models.dncnn import DnCNN  # noqa: E402
from bbzo.oracles.classifier import ClassifierOracle, build_classifier  # noqa: E402
from bbzo.provenance import provenance  # noqa: E402
from common import emit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=17)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--classifier", default="timm:resnet10t")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--coords", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    dev = args.device
    torch.manual_seed(0)
    den = DnCNN(args.depth, args.width).to(dev).eval()
    with torch.no_grad():
        den.last.weight.normal_(0, 0.01)
    last = f"dncnn.{len(den.dncnn) - 1}.weight"
    for n, p in den.named_parameters():
        p.requires_grad_(n == last)
    oracle = ClassifierOracle(build_classifier(args.classifier, 10).to(dev).eval(), max_batch=512).to(dev)
    x = torch.rand(args.batch, 3, args.size, args.size, device=dev).clamp(0, 1)
    y = torch.randint(0, 10, (args.batch,), device=dev)

    def loss(out, t):
        return F.cross_entropy(oracle.query(out), t, reduction="none")

    idx = torch.sort(torch.randperm(den.last.weight.numel(), generator=torch.Generator().manual_seed(0))[:args.coords]).values
    est = lambda: masked(bbzo.create_estimator("cge", mu=5e-3), {last: idx})  # noqa: E731

    def sync():
        if str(dev).startswith("cuda"):
            torch.cuda.synchronize()

    def run_bbzo(reuse):
        ad = bbzo.adapters.make_adapter(den, feature_reuse=reuse)
        bbzo.estimate_grad(den, loss, x, y, est(), adapter=ad, set_grad=False)  # warm-up
        ts = []
        for _ in range(args.reps):
            sync(); t0 = time.perf_counter()
            g = bbzo.estimate_grad(den, loss, x, y, est(), adapter=ad, set_grad=False)[0][last]
            sync(); ts.append(time.perf_counter() - t0)
        return min(ts), g.flatten()[idx]

    @torch.no_grad()
    def run_naive():
        w = den.last.weight
        ts = []
        for _ in range(args.reps):
            sync(); t0 = time.perf_counter()
            base = loss(den(x), y).mean()
            g = torch.zeros(idx.numel(), device=dev)
            for k, i in enumerate(idx.tolist()):
                w.view(-1)[i] += 5e-3
                g[k] = (loss(den(x), y).mean() - base) / 5e-3
                w.view(-1)[i] -= 5e-3
            sync(); ts.append(time.perf_counter() - t0)
        return min(ts), g

    t_reuse, g_reuse = run_bbzo(True)
    t_full, g_full = run_bbzo(False)
    t_naive, g_naive = run_naive()
    with torch.no_grad():
        t0 = time.perf_counter(); den(x); t_den = time.perf_counter() - t0
        z = den(x); t0 = time.perf_counter(); oracle.query(z); t_clf = time.perf_counter() - t0
    result = {
        "benchmark": "defense_reuse",
        "setting": {"denoiser": f"DnCNN {args.depth}x{args.width}", "classifier": args.classifier, "image_px": args.size,
                    "batch": args.batch, "coords": args.coords, "queries_per_step": args.coords + 1, "reps": args.reps,
                    "device": dev},
        "seconds_per_step": {"reuse": round(t_reuse, 4), "no_reuse": round(t_full, 4), "naive": round(t_naive, 4)},
        "speedup": {"reuse_vs_no_reuse": round(t_full / t_reuse, 2), "reuse_vs_naive": round(t_naive / t_reuse, 2)},
        "one_forward_s": {"denoiser": round(t_den, 5), "classifier": round(t_clf, 5)},
        "max_abs_diff_to_naive": {"reuse": float((g_reuse - g_naive).abs().max()),
                                  "no_reuse": float((g_full - g_naive).abs().max())},
        "command": " ".join(["python", *sys.argv]),
        **provenance(),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
