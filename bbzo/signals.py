"""SIGTERM and SIGINT during a run: abandon the step in progress, keep the last completed one, say so truly.

A scheduler sends SIGTERM, a user presses Ctrl-C (SIGINT). Both raise :class:`Interrupted` (a
``KeyboardInterrupt``) in the main thread, so the step in progress is abandoned by the same path as any
failure: the trainer saves the state of the last *completed* step (:meth:`bbzo.trainer.Trainer.step`), the
run writes ``results.json`` with ``status: interrupted``, and the command prints one line naming what the
checkpoint on disk holds and the command that continues it.

Sections that must not be cut in the middle (applying a step: the optimizer, the logs and the checkpoint
write; a collective of a distributed step and the error report after it) run inside :func:`deferred`: a
signal that arrives there is held (with a line saying so) and raised when the section ends.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Any, Callable, Iterator, Optional

__all__ = ["Interrupted", "deferred", "hold", "install", "SIGNAL_NAMES"]

SIGNAL_NAMES = {int(signal.SIGTERM): "SIGTERM", int(signal.SIGINT): "SIGINT"}
_STATE: dict[str, Any] = {"depth": 0, "pending": None, "held": False}


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (``signum``); the step in progress was abandoned."""

    def __init__(self, signum: int, message: Optional[str] = None) -> None:
        self.signum = int(signum)
        super().__init__(message or f"stopped by {SIGNAL_NAMES.get(self.signum, f'signal {self.signum}')}")

    @property
    def name(self) -> str:
        return SIGNAL_NAMES.get(self.signum, f"signal {self.signum}")

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + self.signum


def _handler(signum: int, frame: Any) -> None:
    if _STATE["held"]:  # the run is already stopping with an error: let it report that error whole
        _STATE["pending"] = signum
        return
    if _STATE["depth"] > 0:
        if _STATE["pending"] is None:
            print(f"\n{SIGNAL_NAMES.get(signum, signum)}: finishing and saving the step in progress, then stopping.",
                  file=sys.stderr, flush=True)
        _STATE["pending"] = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGTERM/SIGINT while the block runs; a held signal is raised when the outermost block ends normally.

    A block that ends with an error keeps its error (the run stops anyway, and the error says why: a distributed
    rank stopped by the launcher because another rank died reports that rank, not the launcher's SIGTERM).
    """
    _STATE["depth"] += 1
    ok = False
    try:
        yield
        ok = True
    finally:
        _STATE["depth"] -= 1
        pending = _STATE["pending"]
        if _STATE["depth"] == 0 and pending is not None and not _STATE["held"]:  # held: recorded, never raised
            _STATE["pending"] = None
            if ok:
                raise Interrupted(pending)


def hold() -> None:
    """From now until the handlers are restored, record a signal and never raise it.

    Called when a run is already stopping with an error: saving the last step, writing ``results.json`` and
    printing the error must not be cut by a second cause (under torchrun, the launcher sends SIGTERM to every
    rank as soon as one rank dies; the survivors must still name the rank that died)."""
    _STATE["held"] = True


def install() -> Callable[[], None]:
    """Route SIGTERM and SIGINT to :class:`Interrupted` (main thread only); returns a function restoring the old ones."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    held = _STATE["held"]
    _STATE["held"], _STATE["pending"] = False, None
    for s in old:
        signal.signal(s, _handler)

    def restore() -> None:
        _STATE["held"], _STATE["pending"] = held, None
        for s, h in old.items():
            signal.signal(s, h)

    return restore
