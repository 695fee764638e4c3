"""``--workers M``: the same command, started as M local ranks by ``torch.distributed.run`` (torchrun).

A user who types ``bbzo sol train --workers 2 ...`` gets exactly what
``torchrun --standalone --nproc-per-node 2 -m bbzo.cli.main sol train ...`` gives: torchrun starts the
ranks (one torch thread each unless ``OMP_NUM_THREADS`` says otherwise), hosts the c10d rendezvous on a
free local port and stops every rank when one fails. Multi-node runs use ``torchrun`` directly (see
``docs/parallel.md``); the command is the same.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

__all__ = ["launch_workers", "launcher_command"]


def launcher_command(workers: int, argv: Sequence[str], module: str = "bbzo.cli.main") -> list[str]:
    """The argument list that runs ``python -m module *argv`` as ``workers`` local ranks (no shell)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            f"--nproc-per-node={int(workers)}", "-m", module, *argv]


def launch_workers(workers: int, argv: Sequence[str], module: str = "bbzo.cli.main") -> int:
    """Run the command as ``workers`` ranks and wait; returns the launcher's exit code (0: every rank succeeded)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    try:
        return subprocess.run(launcher_command(workers, argv, module), env=env, check=False).returncode
    except KeyboardInterrupt:
        return 130
