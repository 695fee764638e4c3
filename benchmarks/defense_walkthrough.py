"""The defense quick start of docs/results/defense.md, run as written and timed stage by stage.

Reads the ``bbzo ...`` lines between ``<!-- quickstart:begin -->`` and ``<!-- quickstart:end -->`` of
docs/results/defense.md (so the page and the measurement cannot drift apart), runs each one as a fresh process
in ``--work`` (``$D`` is ``--data``; no shell), and records per stage: wall seconds, CPU seconds of the stage's
processes (user + sys: what the stage costs whatever else the machine runs), the 1-minute load average before
and after, and the stage's headline numbers from its ``results.json``; then the certified-accuracy table.

``--threads 1`` (OMP_NUM_THREADS=1 for every stage) makes the CPU seconds a load-independent upper bound on an
idle 2-core machine's wall time: one thread's compute, which a second core can only shorten (with several
threads on a shared machine, OpenMP's spin-waiting inflates CPU seconds).

    python benchmarks/defense_walkthrough.py --threads 1 --work /tmp/walk --out benchmarks/results/defense_walkthrough.json

Run it from a fresh clone with bbzo installed there to measure what a new user gets.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "results" / "defense.md"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "imagenette_32px.npz"


def quickstart_commands(doc: Path = DOC) -> list[list[str]]:
    """The quick start's ``bbzo`` commands as argument lists (continuation lines joined, ``$D`` kept)."""
    text = doc.read_text()
    m = re.search(r"<!-- quickstart:begin -->\s*```bash\n(.*?)```\s*<!-- quickstart:end -->", text, re.S)
    if m is None:
        raise SystemExit(f"{doc} has no quick-start block (<!-- quickstart:begin --> ... <!-- quickstart:end -->).")
    joined = m.group(1).replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip().startswith("bbzo ")]


def _stage_name(argv: list[str]) -> str:
    return argv[2] if len(argv) > 2 and argv[:2] == ["bbzo", "defense"] else " ".join(argv[:3])


def _out_of(argv: list[str]) -> Optional[str]:
    return argv[argv.index("--out") + 1] if "--out" in argv else None


def _headline(stage: str, res: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a stage a reader looks for."""
    r = res.get("results")
    if stage == "classifier":
        return {k: r.get(k) for k in ("classifier", "params", "epochs", "steps", "test_acc_before", "test_acc")}
    if stage == "pretrain":
        return {k: r.get(k) for k in ("steps", "epochs", "test_psnr_before", "test_psnr")}
    if stage == "finetune":
        return {"label_queries": res.get("label_queries"),
                "methods": [{k: m.get(k) for k in ("method", "queries_per_step", "steps", "queries", "classifier_images",
                                                   "noisy_acc_before", "noisy_acc", "setup_s", "train_s")} for m in r]}
    if stage == "certify":
        return {k: res.get(k) for k in ("images", "certified_accuracy", "max_certifiable_radius", "classifier_queries",
                                         "abstain", "seconds_per_image")}
    return {}


def run(commands: list[list[str]], data: str, work: Path, bbzo: str, extra: dict[str, list[str]],
        log: Optional[Path] = None, threads: int = 0) -> dict[str, Any]:
    """Run the commands in ``work`` (``threads`` > 0: OMP/MKL threads of each stage); returns
    ``{"stages": [...], "wall_s": total}``."""
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads > 0:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    stages = []
    t_all = time.perf_counter()
    for argv in commands:
        stage = _stage_name(argv)
        args = [bbzo if a == "bbzo" else data if a == "$D" else a for a in argv] + extra.get(stage, [])
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        with open(log or os.devnull, "a") as out:
            out.write(f"\n$ {shlex.join(args)}\n")
            out.flush()
            code = subprocess.run(args, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        row: dict[str, Any] = {
            "stage": stage, "command": shlex.join(["bbzo", *("$D" if a == data else a for a in args[1:])]).replace("'$D'", "$D"),
            "exit_code": code, "wall_s": round(wall, 1),
            "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
            "load_average_1min": {"start": round(load0, 2), "end": round(os.getloadavg()[0], 2)}}
        folder = _out_of(args)
        if code == 0 and folder is not None and (work / folder / "results.json").exists():
            res = json.loads((work / folder / "results.json").read_text())
            row["results"] = _headline(stage, res)
            if stage == "certify":
                row["table"] = (work / folder / "results.md").read_text()
        stages.append(row)
        print(f"[{stage}] exit {code}, {wall:.0f} s wall, {row['cpu_s']:.0f} s CPU", file=sys.stderr, flush=True)
        if code != 0:
            break
    return {"stages": stages, "wall_s": round(time.perf_counter() - t_all, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the $D of the quick start")
    ap.add_argument("--work", type=Path, required=True, help="folder the commands run in (their runs/ lands there)")
    ap.add_argument("--bbzo", default=str(Path(sys.executable).with_name("bbzo")), help="the bbzo executable")
    ap.add_argument("--log", type=Path, help="the commands' output (default: WORK/walkthrough.log)")
    ap.add_argument("--threads", type=int, default=0, help="OMP/MKL threads per stage (0: torch's default)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    commands = quickstart_commands()
    res = run(commands, str(args.data.resolve()), args.work, args.bbzo, {}, args.log or args.work / "walkthrough.log",
              threads=args.threads)
    from bbzo.provenance import provenance

    stages = res["stages"]
    result = {
        "benchmark": "defense_walkthrough",
        "what": "docs/results/defense.md's quick start run as written, one fresh process per stage; wall_s is this "
                "machine's under its load, cpu_s the stage's own CPU time (user + sys)",
        "data": str(args.data), "doc": str(DOC.relative_to(ROOT)),
        "completed": len(stages) == len(commands) and all(s["exit_code"] == 0 for s in stages),
        "stages": stages, "total_wall_s": res["wall_s"],
        "total_cpu_s": round(sum(s["cpu_s"] for s in stages), 1),
        "cpus": os.cpu_count(), "threads_per_stage": args.threads or "torch default",
        "command": " ".join(["python", *sys.argv]),
        **provenance(),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
