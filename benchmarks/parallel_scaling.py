"""Forward parallelization on this machine: ResNet-20 Sparse-CGE gradient time with 1 and 2 processes.

Configurations, each measured side by side in one run of this script:

* ``1p x 1t`` -- one process, one torch thread (the baseline of the speed-ups);
* ``1p x 2t`` -- one process, two threads (what a user would otherwise run on 2 cores);
* ``2p x 1t`` -- two ranks of torch.distributed (gloo), one thread each, started by torchrun, every rank
  evaluating its shard of the probes (:class:`bbzo.parallel.DistributedExecutor`).

Every configuration computes the same gradient (same model, batch, 1% coordinate set, feature reuse);
``max_abs_diff`` compares each to ``1p x 1t``. ``balance`` is the slowest shard's evaluation time over the
mean shard's (1.0 = perfect), measured per step. ZO-SOL's parallel equality is tested in
``tests/parallel`` and is not timed here.

    python benchmarks/parallel_scaling.py --out benchmarks/results/parallel_scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bbzo  # noqa: E402
from bbzo import parallel  # noqa: E402
from bbzo.models import create_model  # noqa: E402
from bbzo.provenance import provenance  # noqa: E402
from common import coords_from_flat, emit  # noqa: E402


def measure(density: float, batch: int, reps: int, seed: int) -> dict:
    """Median gradient time of ``reps`` estimates (after one warm-up) in this process (or this rank)."""
    warnings.simplefilter("ignore", bbzo.InefficientSettingsWarning)
    ctx = parallel.setup(60.0)
    torch.manual_seed(seed)
    model = create_model("resnet20").train()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    params = {n: p.detach() for n, p in model.named_parameters()}
    total = sum(p.numel() for p in params.values())
    flat = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: int(round(density * total))].sort().values
    coords = coords_from_flat(params, flat)
    est = bbzo.create_estimator("sparse_cge", coords=coords)
    adapter = bbzo.make_adapter(model)
    executor = parallel.default_executor()
    loss_fn = lambda out, t: F.cross_entropy(out, t, reduction="none")  # noqa: E731
    times, balance, res = [], [], None
    for i in range(reps + 1):
        if ctx is not None:
            torch.distributed.barrier()
        t0 = time.perf_counter()
        res = bbzo.estimate(adapter, est, loss_fn, x, y, executor=executor)
        dt = time.perf_counter() - t0
        if i:
            times.append(dt)
            if ctx is not None:
                busy = executor.last_busy
                balance.append(max(busy) / (sum(busy) / len(busy)))
    grad = torch.cat([res.grads[n].flatten() for n in params]).double()
    return {"times": times, "median_s": statistics.median(times), "balance": balance,
            "grad": grad.tolist(), "queries": res.queries, "threads": torch.get_num_threads(),
            "world": parallel.world_size(), "shard_sizes": getattr(executor, "last_sizes", [])}


def run_config(procs: int, threads: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        worker = [str(Path(__file__).resolve()), "--worker", "--density", str(args.density), "--batch", str(args.batch),
                  "--reps", str(args.reps), "--seed", str(args.seed), "--worker-out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", *worker]
               if procs > 1 else [sys.executable, *worker])
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="configurations are measured in turn this many times")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        r = measure(args.density, args.batch, args.reps, args.seed)
        if parallel.is_writer():
            Path(args.worker_out).write_text(json.dumps(r))
        return
    prov = provenance()
    configs = {"1p x 1t": (1, 1), "1p x 2t": (1, 2), "2p x 1t": (2, 1)}
    runs: dict[str, list[dict]] = {k: [] for k in configs}
    for _ in range(args.rounds):  # interleaved, so a noisy spell hits every configuration
        for name, (p, t) in configs.items():
            runs[name].append(run_config(p, t, args))
    ref = torch.tensor(runs["1p x 1t"][0]["grad"], dtype=torch.float64)
    med = {k: statistics.median(t for r in v for t in r["times"]) for k, v in runs.items()}
    result = {
        "benchmark": "parallel_scaling", "model": "resnet20", "estimator": "sparse_cge",
        "density": args.density, "batch": args.batch, "queries_per_step": runs["1p x 1t"][0]["queries"],
        "gradient_s": {k: round(v, 4) for k, v in med.items()},
        "speedup": {k: round(med["1p x 1t"] / v, 3) for k, v in med.items()},
        "speedup_2p_vs_1p2t": round(med["1p x 2t"] / med["2p x 1t"], 3),
        "max_abs_diff": {k: max(float((torch.tensor(r["grad"], dtype=torch.float64) - ref).abs().max()) for r in v)
                         for k, v in runs.items()},
        "balance_slowest_over_mean": {"median": round(statistics.median(b for r in runs["2p x 1t"] for b in r["balance"]), 3),
                                      "max": round(max(b for r in runs["2p x 1t"] for b in r["balance"]), 3)},
        "shard_sizes": runs["2p x 1t"][0]["shard_sizes"],
        "goal": "2p x 1t >= 1.8x of 1p x 1t, and faster than 1p x 2t",
        "rounds": args.rounds, "reps_per_round": args.reps, "seed": args.seed,
        "command": " ".join(["python", *sys.argv]), **prov,
    }
    result["goal_met"] = result["speedup"]["2p x 1t"] >= 1.8 and result["speedup_2p_vs_1p2t"] > 1.0
    emit(result, args.out)


if __name__ == "__main__":
    main()
