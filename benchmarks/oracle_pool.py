"""Rows per second of the shipped awk simulator with 1 and 2 copies (``--oracle-workers``), side by side.

Each configuration answers the same calls (``--rows`` rows each, the size of a CGE step's chunk on the
heater example) ``--calls`` times; the answers of the pool are checked equal to one copy's. Prints JSON.

    .venv/bin/python benchmarks/oracle_pool.py --out benchmarks/results/oracle_pool.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import emit  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
HEATER = ROOT / "examples" / "custom_simulator" / "heater.sh"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2656, help="rows per call (83 queries x batch 32 on the heater)")
    ap.add_argument("--calls", type=int, default=8)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from bbzo.oracles.process import ProcessPool
    from bbzo.provenance import provenance

    u = torch.from_numpy(np.random.default_rng(0).uniform(-0.2, 1.2, size=(args.rows, 2)))
    res, answers = {}, {}
    for w in [int(x) for x in args.workers.split(",")]:
        with ProcessPool([str(HEATER)], workers=w, timeout=120) as pool:
            pool.query(u[:64])  # warm the pipes
            ts = []
            for _ in range(args.calls):
                t = time.perf_counter()
                answers[w] = pool.query(u)
                ts.append(time.perf_counter() - t)
        med = statistics.median(ts)
        res[str(w)] = {"seconds_per_call": round(med, 4), "rows_per_s": round(args.rows / med, 1)}
    base = res["1"]["rows_per_s"]
    for w, r in res.items():
        r["speedup"] = round(r["rows_per_s"] / base, 2)
    same = all(torch.equal(a, answers[1]) for a in answers.values())
    out = {"benchmark": "oracle_pool", "program": "examples/custom_simulator/heater.sh (awk, text protocol)",
           "rows_per_call": args.rows, "calls": args.calls, "workers": res, "answers_identical": same,
           "command": " ".join(["python", *sys.argv]), "provenance": provenance()}
    emit(out, args.out)


if __name__ == "__main__":
    main()
