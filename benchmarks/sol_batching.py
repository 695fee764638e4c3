"""Why ZO-SOL batches: seconds per state-step of the black-box PhiFlow solver at batch size K. Prints JSON.

One ZO-SOL query batch is K perturbed correctors x B start states, stepped by the solver as ONE PhiFlow
batch. This measures the black-box solver alone (``KarmanOracle``, 32 x 64, one thread; torch with
PhiML's jit, and numpy), median of ``--repeats`` calls after a first (tracing) call.

    .venv/bin/python benchmarks/sol_batching.py --out benchmarks/results/sol_batching.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bbzo.provenance import provenance


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", default="1,8,32,64,128")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backends", default="torch,numpy")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from bbzo.oracles.karman import KarmanOracle, KarmanSetup, KarmanSolver
    from common import emit  # benchmarks/ is on sys.path when run as a script

    setup = KarmanSetup()
    base = KarmanSolver(setup, backend="numpy", jit=False).initial_state([390.6])
    rows = []
    for backend in args.backends.split(","):
        oracle = KarmanOracle(setup, backend=backend, min_bucket=1)
        for k in (int(x) for x in args.ks.split(",")):
            x = base.expand(k, -1, -1, -1).contiguous()
            re = torch.full((k,), 390.6)
            t0 = time.perf_counter()
            x = oracle.query(x, re)  # first call traces the jit for this batch size
            first = time.perf_counter() - t0
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                x = oracle.query(x, re)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            rows.append({"backend": backend, "K": k, "s_per_batched_step": round(med, 4),
                         "ms_per_state_step": round(1000 * med / k, 2), "first_call_s": round(first, 2)})
            print(json.dumps(rows[-1]), flush=True)
    for backend in args.backends.split(","):
        r = [x for x in rows if x["backend"] == backend]
        one = next((x for x in r if x["K"] == 1), None)
        for x in r:
            x["cheaper_per_state_than_K1"] = round(one["ms_per_state_step"] / x["ms_per_state_step"], 1) if one else None
    out = {"benchmark": "sol_batching", "grid": f"{setup.nx}x{setup.ny}", "threads": 1, "rows": rows,
           "command": "python " + " ".join(sys.argv), "provenance": provenance()}
    emit(out, args.out)


if __name__ == "__main__":
    main()
