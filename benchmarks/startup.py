"""How fast the command line starts: ``bbzo --help``, ``--version`` and every ``bbzo <command> --help`` against
``python -c "import torch"``, measured side by side.

Every round runs each command once, in an order shuffled per round (so machine load drifts over all of them
alike), each as a fresh process; the JSON has the median and the spread of each command's seconds, its ratio
to the median of ``import torch`` in the same rounds, and which heavy packages each command imported
(``-X importtime`` of one extra run). Goal (issue 32): every help / version command within 1.3x of
``import torch``.

    python benchmarks/startup.py --rounds 7 --out benchmarks/results/startup.json
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

HEAVY = ("torch", "torchvision", "scipy", "timm", "phi", "phiml", "matplotlib", "PIL")
_SCRIPT = Path(sys.executable).with_name("bbzo")  # the console script users run (python runs it, as its shebang would)
BBZO = [sys.executable, str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "bbzo.cli.main"]
COMMANDS: dict[str, list[str]] = {
    "import torch": [sys.executable, "-c", "import torch"],
    "bbzo --help": [*BBZO, "--help"],
    "bbzo --version": [*BBZO, "--version"],
    "bbzo demo --help": [*BBZO, "demo", "--help"],
    "bbzo train --help": [*BBZO, "train", "--help"],
    "bbzo check --help": [*BBZO, "check", "--help"],
    "bbzo prune --help": [*BBZO, "prune", "--help"],
    "bbzo sol --help": [*BBZO, "sol", "--help"],
    "bbzo sol train --help": [*BBZO, "sol", "train", "--help"],
    "bbzo cifar train --help": [*BBZO, "cifar", "train", "--help"],
    "bbzo defense --help": [*BBZO, "defense", "--help"],
    "bbzo defense classifier --help": [*BBZO, "defense", "classifier", "--help"],
    "bbzo defense pretrain --help": [*BBZO, "defense", "pretrain", "--help"],
    "bbzo defense finetune --help": [*BBZO, "defense", "finetune", "--help"],
    "bbzo defense certify --help": [*BBZO, "defense", "certify", "--help"],
    "bbzo run --help": [*BBZO, "run", "--help"],
}


def _time(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


def _heavy_imports(cmd: list[str], env: dict[str, str]) -> list[str]:
    """The heavy top-level packages ``cmd`` imports (``python -X importtime``)."""
    err = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], check=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env=env).stderr
    names = {line.split("|")[-1].strip().split(".")[0] for line in err.splitlines() if line.startswith("import time:")}
    return sorted(n for n in names if n in HEAVY)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--goal", type=float, default=1.3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    load_start = round(os.getloadavg()[0], 2)
    order = list(COMMANDS)
    rng = random.Random(args.seed)
    seconds: dict[str, list[float]] = {k: [] for k in order}
    _time(COMMANDS["import torch"], env)  # warm the file cache once, untimed
    for r in range(args.rounds):
        rng.shuffle(order)
        for name in order:
            seconds[name].append(round(_time(COMMANDS[name], env), 3))
        print(f"[round {r + 1}/{args.rounds}] " + ", ".join(f"{k}: {seconds[k][-1]:.2f}" for k in COMMANDS),
              file=sys.stderr, flush=True)
    torch_s = statistics.median(seconds["import torch"])
    rows = {}
    for name, cmd in COMMANDS.items():
        med = statistics.median(seconds[name])
        rows[name] = {"median_s": round(med, 3), "min_s": min(seconds[name]), "max_s": max(seconds[name]),
                      "ratio_to_import_torch": round(med / torch_s, 3), "seconds": seconds[name],
                      "heavy_imports": _heavy_imports(cmd, env)}
    worst = max((r["ratio_to_import_torch"] for n, r in rows.items() if n != "import torch"))
    from bbzo.provenance import provenance

    result = {
        "benchmark": "startup",
        "what": "seconds from process start to exit, each command a fresh process, rounds interleaved in a shuffled "
                "order; ratio = a command's median / the median of `python -c 'import torch'` in the same rounds",
        "rounds": args.rounds, "seed": args.seed, "goal_ratio": args.goal,
        "worst_ratio": worst, "goal_met": worst <= args.goal,
        "commands": rows,
        "load_average_1min": {"start": load_start, "end": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()},
        "command": " ".join(["python", *sys.argv]),
        **provenance(),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
