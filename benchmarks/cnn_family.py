"""A full CGE step on DeepZero's Fig. 2 CNN family (730 / 3,700 / 6,670 parameters, batch 256, all coordinates).

For each model, in one run: one forward, one forward + backward, the naive loop (perturb one coordinate in
place, full forward + loss, restore; timed on a sample of coordinates and scaled to all of them), bbzo's
full CGE step with its default adapter (stage- and channel-level reuse), with stage-level reuse only, and
without feature reuse (every probe a whole batched forward: ``make_adapter(model, feature_reuse=False)``),
the last two timed on a random subset of the coordinates (same layer mix) and scaled to all of them.

DeepZero Fig. 3 (wall time per CGE epoch with and without feature reuse) follows as ``epoch_s``: the step
times x ``--epoch-steps`` (39 = 10,000 images / batch 256, the CPU-scale Fig. 2 runs), data loading not
included (under 1% of a step).
Train-mode BN (each perturbed set its own batch statistics), cross-entropy, forward CGE at mu 5e-3, on real
CIFAR-10 images when ``--data`` exists (else random images, which time the same). Prints JSON.

    .venv/bin/python benchmarks/cnn_family.py --threads 2 --out benchmarks/results/cnn_family_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import bbzo

from bbzo.adapters import FunctionalAdapter, StagedAdapter, frozen_bn_stats
from bbzo.models import create_model
from bbzo.provenance import provenance
from bbzo.step import estimate

from common import coords_from_flat, emit  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent
DEFAULT_DATA = ROOT.parents[1] / "shared" / "data" / "cifar10_subset.npz"


def timed(fn, reps: int, warmup: int = 1, sync=lambda: None) -> float:
    for _ in range(warmup):
        fn()
        sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="simple_cnn_730,simple_cnn_3700,simple_cnn_6670")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--naive-coords", type=int, default=40, help="coordinates the naive loop is timed on")
    ap.add_argument("--stage-fraction", type=float, default=0.25,
                    help="fraction of the coordinates the stage-level-only path is timed on (it is slow)")
    ap.add_argument("--no-reuse-fraction", type=float, default=0.05,
                    help="fraction of the coordinates the no-reuse path is timed on (it is slower still)")
    ap.add_argument("--epoch-steps", type=int, default=39, help="steps per epoch for the Fig. 3 epoch times")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if args.data.is_file():
        from bbzo.tasks.cifar import load_image_classification

        xs, ys = load_image_classification(args.data, "train")
        x, y, source = xs[:args.batch].to(dev), ys[:args.batch].to(dev), str(args.data.name)
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, 3, 32, 32, generator=g).to(dev)
        y = torch.randint(0, 10, (args.batch,), generator=g).to(dev)
        source = "random images (no --data file)"

    def ce(o, t):
        return F.cross_entropy(o, t, reduction="none")

    rows = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        torch.manual_seed(0)
        model = create_model(name).to(dev).train()
        params = {n: p.detach() for n, p in model.named_parameters()}
        d = sum(p.numel() for p in params.values())
        with torch.no_grad(), frozen_bn_stats(model):
            fwd = timed(lambda: model(x), 5 * args.reps, 3, sync)

        def fwd_bwd():
            model.zero_grad(set_to_none=True)
            with frozen_bn_stats(model):
                ce(model(x), y).mean().backward()
        fb = timed(fwd_bwd, 3 * args.reps, 2, sync)

        owners = [(n, i) for n, p in params.items() for i in range(p.numel())]
        g = torch.Generator().manual_seed(1)
        sample = [owners[j] for j in torch.randperm(d, generator=g)[:args.naive_coords].tolist()]

        def naive():
            with torch.no_grad(), frozen_bn_stats(model):
                base = ce(model(x), y).mean()
                for n, i in sample:
                    p = params[n].view(-1)
                    old = p[i].item()
                    p[i] += 5e-3
                    _ = (ce(model(x), y).mean() - base) / 5e-3
                    p[i] = old
        naive_per = timed(naive, 1, 1, sync) / len(sample)

        est = bbzo.create_estimator("cge", mu=5e-3)
        adapter = StagedAdapter(model)
        res = {}

        def step():
            res["r"] = estimate(adapter, est, ce, x, y)
        cge_s = timed(step, args.reps, 1, sync)
        assert res["r"].queries == d + 1

        # stage-level reuse only, on a random subset of the coordinates (same layer mix), scaled to d
        sel = torch.randperm(d, generator=g)[: max(20, int(args.stage_fraction * d))].sort().values
        sub = coords_from_flat(params, sel)
        stage_adapter = StagedAdapter(model, channel_reuse=False)
        sub_est = bbzo.create_estimator("sparse_cge", coords=sub, mu=5e-3)
        stage_s = timed(lambda: estimate(stage_adapter, sub_est, ce, x, y), 1, 1, sync) * d / sel.numel()

        # no feature reuse at all: every probe runs the whole network (batched over the probes)
        sel = torch.randperm(d, generator=g)[: max(20, int(args.no_reuse_fraction * d))].sort().values
        sub_est = bbzo.create_estimator("sparse_cge", coords=coords_from_flat(params, sel), mu=5e-3)
        plain = FunctionalAdapter(model)
        plain_s = timed(lambda: estimate(plain, sub_est, ce, x, y), 1, 1, sync) * d / sel.numel()

        naive_step = naive_per * d + fwd
        rows[name] = {
            "params": d, "forward_ms": round(1e3 * fwd, 3), "forward_backward_ms": round(1e3 * fb, 3),
            "naive_step_s": round(naive_step, 3), "naive_ms_per_coord": round(1e3 * naive_per, 3),
            "cge_step_s": round(cge_s, 3), "cge_ms_per_coord": round(1e3 * cge_s / (d + 1), 4),
            "stage_reuse_step_s": round(stage_s, 3), "no_reuse_step_s": round(plain_s, 3),
            "epoch_s": {"reuse": round(cge_s * args.epoch_steps, 1), "stage_reuse_only": round(stage_s * args.epoch_steps, 1),
                        "no_reuse": round(plain_s * args.epoch_steps, 1)},
            "fig3_reuse_speedup_per_epoch": round(plain_s / cge_s, 1),
            "speedup_vs_naive": round(naive_step / cge_s, 1),
            "speedup_vs_stage_reuse": round(stage_s / cge_s, 1),
            "cge_step_over_forward_backward": round(cge_s / fb, 1),
            "cge_per_coord_over_forward": round(cge_s / (d + 1) / fwd, 4),
        }
        print(name, rows[name], file=sys.stderr, flush=True)
    out = {"benchmark": "cnn_family", "batch": args.batch, "epoch_steps": args.epoch_steps,
           "fig3_goal": "CGE epoch with feature reuse at least 3x faster than without (paper: about 2x)", "data": source, "device": str(dev),
           "threads": torch.get_num_threads(), "bn": "train mode, per-perturbation batch statistics",
           "estimator": "cge forward, mu 5e-3, all coordinates", "models": rows,
           "seeds": {"model_init": 0, "naive_sample": 1, "random_images": 0},
           "command": " ".join(["python", *sys.argv]), "provenance": provenance()}
    emit(out, args.out)


if __name__ == "__main__":
    main()
