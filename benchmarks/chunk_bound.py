"""The staged adapter's CPU chunk bound, side by side: dense activations counted per perturbed set (``--counts``).

Past a coordinate's first mixing layer the chunk bound counts ``DENSE_SETS_CPU`` dense activations per perturbed
set (:func:`bbzo.adapters.common.dense_sets`). This times one gradient estimate with each count, alternated in
one process (``--rounds`` times, after one warm-up each), on:

* ``resnet20`` -- batch 64 random images, 1% random coordinates (as ``cge_throughput.py``), train-mode BN; also
  the stage-level-only path (``channel_reuse=False``), whose chunking the count does not touch (a noise check);
* ``simple_cnn_730`` / ``simple_cnn_3700`` / ``simple_cnn_6670`` -- batch 256, every coordinate (as
  ``cnn_family.py``).

    python benchmarks/chunk_bound.py --threads 2 --out benchmarks/results/chunk_bound_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import bbzo

import bbzo.adapters.common as adapters_common
from bbzo.adapters import StagedAdapter
from bbzo.models import create_model
from bbzo.provenance import provenance
from bbzo.step import estimate

from common import coords_from_flat, emit  # benchmarks/ is on sys.path when run as a script


def workload(name: str, seed: int) -> tuple:
    torch.manual_seed(seed)
    model = create_model(name).train()
    b = 64 if name == "resnet20" else 256
    x, y = torch.randn(b, 3, 32, 32), torch.randint(0, 10, (b,))
    if name != "resnet20":
        return model, x, y, bbzo.create_estimator("cge")
    params = {n: p.detach() for n, p in model.named_parameters()}
    total = sum(p.numel() for p in params.values())
    flat = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: int(round(0.01 * total))]
    return model, x, y, bbzo.create_estimator("sparse_cge", coords=coords_from_flat(params, flat.sort().values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet20,simple_cnn_730,simple_cnn_3700,simple_cnn_6670")
    ap.add_argument("--counts", default="2,6", help="dense activations per set to compare (2 = before 7617d22)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", bbzo.InefficientSettingsWarning)
    counts = [int(c) for c in args.counts.split(",")]
    loss_fn = lambda out, t: F.cross_entropy(out, t, reduction="none")  # noqa: E731
    default = adapters_common.DENSE_SETS_CPU
    results = {}
    try:
        for name in args.models.split(","):
            model, x, y, est = workload(name, args.seed)
            paths = {"channel": StagedAdapter(model)}
            if name == "resnet20":
                paths["stage_only"] = StagedAdapter(model, channel_reuse=False)
            times = {p: {c: [] for c in counts} for p in paths}
            for rnd in range(args.rounds + 1):
                for p, adapter in paths.items():
                    for c in counts:
                        adapters_common.DENSE_SETS_CPU = c
                        t = time.perf_counter()
                        estimate(adapter, est, loss_fn, x, y)
                        if rnd:  # round 0 warms up
                            times[p][c].append(time.perf_counter() - t)
            results[name] = {p: {"step_s": {str(c): round(statistics.median(v), 3) for c, v in tc.items()},
                                 "step_s_all": {str(c): [round(s, 3) for s in v] for c, v in tc.items()},
                                 "old_over_new": round(statistics.median(tc[counts[0]]) /
                                                       statistics.median(tc[counts[-1]]), 3)}
                             for p, tc in times.items()}
    finally:
        adapters_common.DENSE_SETS_CPU = default
    emit({"benchmark": "chunk_bound", "counts": counts, "default": default, "rounds": args.rounds,
          "threads": torch.get_num_threads(), "seed": args.seed, "models": results,
          "command": " ".join(["python", *sys.argv]), "provenance": provenance()}, args.out)


if __name__ == "__main__":
    main()
