"""One run folder, one run at a time: ``run.lock``, held for the run's life.

Two commands writing into the same ``--out`` would interleave ``metrics.jsonl`` and leave ``run.json`` and the
checkpoint disagreeing. The lock is an exclusive ``flock`` on ``OUT/run.lock``: the operating system releases it
when the process ends, however it ends, so a lock can never outlive its holder. The file also records who holds
it (PID, host, command, start time): a second command is refused with that line, and a file left by a run that
was killed (its PID no longer running) is named when the next run takes the folder over.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover -- Windows: no locking (documented)
    fcntl = None  # type: ignore[assignment]

__all__ = ["RunLock", "LOCK_NAME"]

LOCK_NAME = "run.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run folder (see the module docstring).

    Attributes:
        stale: What the lock file said when this process took over a folder whose last holder had died, or None.
    """

    def __init__(self, folder: Path, command: str = "") -> None:
        self.path = Path(folder) / LOCK_NAME
        self.command = command
        self._fd: Optional[int] = None
        self.stale: Optional[dict[str, Any]] = None

    def _read(self) -> dict[str, Any]:
        try:
            info = json.loads(self.path.read_text() or "{}")
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        """Take the lock or raise :class:`~bbzo.errors.ConfigError` naming the run that holds it."""
        if fcntl is None or self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            info = self._read()
            who = (f"PID {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}: "
                   f"{info.get('command', '?')}") if info else "another process"
            raise ConfigError(f"{self.path.parent} is in use by another bbzo run ({who}). Wait for it to finish, stop "
                              "it, or use another --out.") from None
        previous = self._read()
        if previous.get("pid") not in (None, os.getpid()) and not _alive(int(previous["pid"])):
            self.stale = previous  # its holder died without releasing the file (killed): the OS released the lock
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the file and release the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
