"""ZO-SOL at CPU scale (issue 4): test MAE of SRC / NON / ZO-SOL / FO-SOL on held-out Re. Prints JSON.

Runs the ``sol`` task with the ``small`` preset (override any setting with KEY=VALUE, JSON values) on
data it generates (cached in --data-dir), and writes the summary, with the command that produced it,
the queries and the wall time of every method, to ``--out-json``.

    .venv/bin/python benchmarks/sol_small.py --out-json benchmarks/results/sol_small.json

Paper (full scale, GPU): SRC 0.180, NON 0.153, ZO-SOL 0.119, FO-SOL 0.074.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--run-dir", type=Path, default=Path("runs/sol-small"))
    ap.add_argument("--data-dir", type=Path, default=Path("runs/sol-data"))
    ap.add_argument("--out-json", type=Path)
    ap.add_argument("--methods", default="src,non,zo,fo")
    ap.add_argument("set", nargs="*", help="KEY=VALUE overrides of the preset (JSON values), e.g. steps=200")
    args = ap.parse_args()

    from bbzo.config import resolve
    from bbzo.provenance import provenance
    from bbzo.run import run_task
    from bbzo.tasks.sol import TASK, SolSettings

    over = {}
    for item in args.set:
        k, v = item.split("=", 1)
        over[k] = json.loads(v)
    cfg, sources = resolve(SolSettings, {"preset": args.preset, "out": args.run_dir, "data_dir": args.data_dir,
                                         "methods": args.methods, "no_progress": True, **over})
    t0 = time.perf_counter()
    s = run_task(TASK, cfg, sources)
    ev = s["eval"]
    src = ev["src"]["mae"] if "src" in ev else None
    out = {
        "benchmark": "sol_small",
        "command": " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), CPU",
        "test_mae": {m: e["mae"] for m, e in ev.items()},
        "test_mae_per_re": {m: e["mae_per_re"] for m, e in ev.items()},
        "vs_src": {m: round(e["mae"] / src - 1, 4) for m, e in ev.items()} if src else None,
        "train": s["train"],
        "data_seconds": s["data_seconds"],
        "eval_seconds": s["eval_seconds"],
        "total_seconds": round(time.perf_counter() - t0, 1),
        "config": s["config"],
        "provenance": provenance(),
        "paper_full_scale": {"src": 0.180, "non": 0.153, "zo": 0.119, "fo": 0.074},
        "table": s["table"],
    }
    emit(out, args.out_json)


def emit(result: dict, path: "Path | None") -> None:
    """Print ``result`` as JSON and, if ``path`` is given, write it there too."""
    text = json.dumps(result, indent=1)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


if __name__ == "__main__":
    main()
