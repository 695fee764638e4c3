"""``--workers M`` for every training command: relaunch under torch.distributed.run, report on rank 0."""

from __future__ import annotations

import sys
from typing import Any

import click

__all__ = ["relaunch_if_needed", "reports"]


def relaunch_if_needed(settings: Any) -> None:
    """With ``--workers M > 1`` outside torchrun: run this same command as M ranks, then exit with their code."""
    from bbzo.parallel.context import under_launcher
    from bbzo.parallel.launch import launch_workers

    m = int(getattr(settings, "workers", 1) or 1)
    if m <= 1 or under_launcher():
        return
    code, signum = launch_workers(m, sys.argv[1:])
    if signum:
        click.echo(f"interrupted: every one of the {m} workers has stopped; rank 0's line above says which step its "
                   "checkpoint holds. Continue with the same command and --resume (any --workers).", err=True)
        sys.exit(128 + signum)
    if code != 0:
        click.echo(f"error: the run with {m} workers failed (launcher exit code {code}); the first error above names "
                   "the rank and step. Fix the cause, then rerun the same command with --resume (any --workers).",
                   err=True)
    sys.exit(code)


def reports() -> bool:
    """Whether this process prints the run's report (rank 0 of a distributed run, or a serial run)."""
    from bbzo.parallel import is_writer

    return is_writer()
