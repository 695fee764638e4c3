"""Forward parallelization on this machine: Sparse-CGE gradient time with 1 and 2 processes, two workloads.

* ``resnet20`` -- ResNet-20 with stage-level feature reuse, a random ``--density`` coordinate set, batch
  ``--batch`` of random images (train-mode BN), cross-entropy;
* ``zo-sol`` -- one ZO-SOL gradient of the demo preset: the tiny corrector inside an ``--unroll``-step
  rollout of the black-box PhiFlow solver (32 x 64, torch backend with jit), 5% of its coordinates (the
  task's sparsity 0.95), mu 1e-4, 32 perturbed correctors per PhiFlow batch (whole batched calls are
  dealt to the ranks).

Configurations, each measured side by side in one run of this script:

* ``1p x 1t`` -- one process, one torch thread (the baseline of the speed-ups);
* ``1p x 2t`` -- one process, two threads (what a user would otherwise run on 2 cores);
* ``2p x 1t`` -- two ranks of torch.distributed (gloo), one thread each, started by torchrun, every rank
  evaluating its shard of the probes (:class:`bbzo.parallel.DistributedExecutor`).

With ``--device cuda`` (ResNet-20 only) the configurations are ``--gpu-procs`` processes sharing one GPU (``1p``,
``2p``, ``4p`` by default: one rank's chunks do not fill a big GPU at batch 64), each with one CPU thread; several
ranks on one GPU gather their losses through gloo (NCCL wants a GPU per rank, see
:func:`bbzo.parallel.plan_devices`). The speed-ups are then against ``1p``, and no goal is checked.

Within a workload every configuration computes the same gradient (same model, batch, coordinate set);
``max_abs_diff`` compares each to ``1p x 1t``. ``balance`` is the slowest shard's evaluation time over the
mean shard's (1.0 = perfect), measured per step.

    python benchmarks/parallel_scaling.py --out benchmarks/results/parallel_scaling.json
    python benchmarks/parallel_scaling.py --device cuda --out benchmarks/results/parallel_scaling_cuda.json
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
from bbzo.adapters import make_adapter  # noqa: E402
from bbzo.step import estimate  # noqa: E402
from bbzo import parallel  # noqa: E402
from bbzo.models import create_model  # noqa: E402
from bbzo.provenance import provenance  # noqa: E402
from common import coords_from_flat, emit  # noqa: E402


def random_coords(params: dict, density: float, seed: int) -> dict:
    total = sum(p.numel() for p in params.values())
    flat = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: int(round(density * total))].sort().values
    return coords_from_flat(params, flat)


def resnet_workload(args: argparse.Namespace) -> tuple:
    torch.manual_seed(args.seed)
    model = create_model("resnet20").train()
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    model, x, y = model.to(args.device), x.to(args.device), y.to(args.device)
    params = {n: p.detach() for n, p in model.named_parameters()}
    est = bbzo.create_estimator("sparse_cge", coords=random_coords(params, args.density, args.seed))
    loss_fn = lambda out, t: F.cross_entropy(out, t, reduction="none")  # noqa: E731
    return params, make_adapter(model), est, loss_fn, x, y


def sol_workload(args: argparse.Namespace) -> tuple:
    from bbzo.adapters import LoopAdapter
    from bbzo.models.sol_corrector import CORRECTOR_CHANNELS, Corrector
    from bbzo.oracles.karman import KarmanOracle, KarmanSetup, KarmanSolver
    from bbzo.tasks.sol import make_rollout

    setup = KarmanSetup()
    state = KarmanSolver(setup, backend="numpy", jit=False).initial_state([390.6])
    std = torch.tensor([1.0, 0.5])
    torch.manual_seed(args.seed)
    model = Corrector(CORRECTOR_CHANNELS["tiny"], torch.tensor([1.0, 0.5, 800.0]), std, zero_last=False)
    params = {n: p.detach() for n, p in model.named_parameters()}
    est = bbzo.create_estimator("sparse_cge", coords=random_coords(params, 0.05, args.seed), mu=1e-4)
    rollout = make_rollout(KarmanOracle(setup).query, std)
    targets = torch.zeros(1, args.unroll, *state.shape[1:])
    return params, LoopAdapter(model, sets_per_call=32), est, rollout, (state, torch.tensor([390.6])), targets


def measure(args: argparse.Namespace) -> dict:
    """Median gradient time of ``reps`` estimates (after one warm-up) in this process (or this rank)."""
    warnings.simplefilter("ignore", bbzo.InefficientSettingsWarning)
    ctx = parallel.setup(60.0, device=args.device)
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
    params, adapter, est, loss_fn, x, y = (sol_workload if args.workload == "zo-sol" else resnet_workload)(args)
    executor = parallel.default_executor()
    reps = args.reps
    times, balance, res = [], [], None
    for i in range(reps + 1):
        if ctx is not None:
            torch.distributed.barrier()
        t0 = time.perf_counter()
        res = estimate(adapter, est, loss_fn, x, y, executor=executor)
        sync()
        dt = time.perf_counter() - t0
        if i:
            times.append(dt)
            if ctx is not None:
                busy = executor.last_busy
                balance.append(max(busy) / (sum(busy) / len(busy)))
    grad = torch.cat([res.grads[n].flatten() for n in params]).double().cpu()
    return {"times": times, "median_s": statistics.median(times), "balance": balance,
            "grad": grad.tolist(), "queries": res.queries, "threads": torch.get_num_threads(),
            "world": parallel.world_size(), "shard_sizes": getattr(executor, "last_sizes", [])}


def run_config(workload: str, procs: int, threads: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        worker = [str(Path(__file__).resolve()), "--worker", "--workload", workload, "--density", str(args.density),
                  "--batch", str(args.batch), "--unroll", str(args.unroll), "--reps", str(args.reps),
                  "--seed", str(args.seed), "--device", args.device, "--worker-out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", *worker]
               if procs > 1 else [sys.executable, *worker])
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        return json.loads(out.read_text())


def summarize(runs: dict) -> dict:
    """Medians, speed-ups against the first configuration, shard balance and the difference to it."""
    first = next(iter(runs))
    ref = torch.tensor(runs[first][0]["grad"], dtype=torch.float64)
    med = {k: statistics.median(t for r in v for t in r["times"]) for k, v in runs.items()}
    multi = [k for k in runs if runs[k][0]["world"] > 1]
    bal = [b for k in multi for r in runs[k] for b in r["balance"]]
    out = {
        "queries_per_step": runs[first][0]["queries"],
        "gradient_s": {k: round(v, 4) for k, v in med.items()},
        "gradient_s_all": {k: [round(t, 4) for r in v for t in r["times"]] for k, v in runs.items()},
        "speedup": {k: round(med[first] / v, 3) for k, v in med.items()},
        "max_abs_diff": {k: max(float((torch.tensor(r["grad"], dtype=torch.float64) - ref).abs().max()) for r in v)
                         for k, v in runs.items()},
        "grad_abs_max": float(ref.abs().max()),
        "balance_slowest_over_mean": {"median": round(statistics.median(bal), 3), "max": round(max(bal), 3)},
        "shard_sizes": {k: runs[k][0]["shard_sizes"] for k in multi},
    }
    if "2p x 1t" in med:  # the CPU goal
        out["speedup_2p_vs_1p2t"] = round(med["1p x 2t"] / med["2p x 1t"], 3)
        out["shard_sizes"] = out["shard_sizes"]["2p x 1t"]
        out["goal_met"] = out["speedup"]["2p x 1t"] >= 1.8 and out["speedup_2p_vs_1p2t"] > 1.0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workloads", default="resnet20,zo-sol")
    ap.add_argument("--unroll", type=int, default=4, help="zo-sol: solver steps per rollout (demo preset: 4)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="configurations are measured in turn this many times")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: processes sharing one GPU (resnet20 only)")
    ap.add_argument("--gpu-procs", default="1,2,4", help="with --device cuda: processes per GPU to compare")
    ap.add_argument("--out")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        r = measure(args)
        if parallel.is_writer():
            Path(args.worker_out).write_text(json.dumps(r))
        return
    prov = provenance()
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        configs = {f"{p}p": (p, 1) for p in map(int, args.gpu_procs.split(","))}
        args.workloads = "resnet20" if args.workloads == "resnet20,zo-sol" else args.workloads
    else:
        configs = {"1p x 1t": (1, 1), "1p x 2t": (1, 2), "2p x 1t": (2, 1)}
    workloads = args.workloads.split(",")
    if cuda and workloads != ["resnet20"]:
        sys.exit("--device cuda measures the resnet20 workload only (zo-sol's PhiFlow solver runs on CPU).")
    runs = {w: {k: [] for k in configs} for w in workloads}
    for _ in range(args.rounds):  # interleaved, so a noisy spell hits every configuration
        for w in workloads:
            for name, (p, t) in configs.items():
                runs[w][name].append(run_config(w, p, t, args))
    result = {"benchmark": "parallel_scaling", "estimator": "sparse_cge",
              "workloads": {w: summarize(runs[w]) for w in workloads},
              "goal": ("none on CUDA: processes sharing one GPU, against one" if cuda else
                       "per workload: 2p x 1t >= 1.8x of 1p x 1t, and faster than 1p x 2t"),
              "device": args.device, "configurations": {k: {"procs": p, "threads": t} for k, (p, t) in configs.items()},
              "settings": {"resnet20": {"density": args.density, "batch": args.batch},
                           "zo-sol": {"corrector": "tiny", "unroll": args.unroll, "density": 0.05, "mu": 1e-4,
                                      "sets_per_call": 32, "grid": "32x64", "backend": "torch"}},
              "rounds": args.rounds, "reps_per_round": args.reps, "seed": args.seed,
              "command": " ".join(["python", *sys.argv]), **prov}
    if cuda:
        result["gpu"] = torch.cuda.get_device_name(0)
    else:
        result["goal_met"] = all(r["goal_met"] for r in result["workloads"].values())
    emit(result, args.out)


if __name__ == "__main__":
    main()
