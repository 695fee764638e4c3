"""``--workers M``: the same command, started as M local ranks by ``torch.distributed.run`` (torchrun).

A user who types ``bbzo sol train --workers 2 ...`` gets exactly what
``torchrun --standalone --nproc-per-node 2 -m bbzo.cli.main sol train ...`` gives: torchrun starts the
ranks (one torch thread each unless ``OMP_NUM_THREADS`` says otherwise), hosts the c10d rendezvous on a
free local port and stops every rank when one fails. Multi-node runs use ``torchrun`` directly (see
``docs/parallel.md``); the command is the same.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any, Sequence

__all__ = ["launch_workers", "launcher_command"]


def launcher_command(workers: int, argv: Sequence[str], module: str = "bbzo.cli.main") -> list[str]:
    """The argument list that runs ``python -m module *argv`` as ``workers`` local ranks (no shell)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            f"--nproc-per-node={int(workers)}", "-m", module, *argv]


def launch_workers(workers: int, argv: Sequence[str], module: str = "bbzo.cli.main") -> tuple[int, int]:
    """Run the command as ``workers`` ranks and wait for them.

    SIGTERM and SIGINT sent to this process are passed on to the launcher, which passes them on to every rank
    (each saves what it must and stops); this process waits for all of them, so no rank is left running.
    Returns ``(the launcher's exit code, the signal this process received or 0)``.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    child = subprocess.Popen(launcher_command(workers, argv, module), env=env, start_new_session=True)
    received = {"signum": 0}

    def forward(signum: int, frame: Any) -> None:
        received["signum"] = received["signum"] or signum
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                return child.wait(), received["signum"]
            except KeyboardInterrupt:  # a handler installed before ours: keep waiting for the ranks
                continue
    finally:
        for s, h in old.items():
            signal.signal(s, h)
