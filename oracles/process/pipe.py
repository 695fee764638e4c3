"""An external program behind two pipes: start, handshake, one exchange at a time, stderr drained, stop.

Started from an argument list (never through a shell) in its own process group, so that killing it
kills its children too. stderr is drained by a thread (so the program can never block on it); its last
lines are kept for error messages and optionally appended to a log file. POSIX only (``selectors`` on pipes).
"""

from __future__ import annotations

import collections
import os
import selectors
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from .protocol import MAX_LINE, PROTOCOL_VERSION, Transport, first_bytes

__all__ = ["Program"]


#: A reply arriving in reads smaller than this is trickling in line by line: wait ``TRICKLE_WAIT_S`` before the
#: next read, so that one wakeup takes many lines (a wakeup per line cost bbzo's process ~25 ms of CPU per
#: 1,300-line reply, a third of what the heater example's awk program itself needs).
TRICKLE_BYTES = 8192
TRICKLE_WAIT_S = 0.001


class Program:
    """One running copy of an oracle program (restartable). All failures are :class:`~.protocol.Transport`."""

    def __init__(self, argv: Sequence[str], *, cwd: Optional[Union[str, os.PathLike]] = None,
                 env: Optional[Mapping[str, str]] = None, stderr_lines: int = 20,
                 stderr_log: Optional[Union[str, os.PathLike]] = None) -> None:
        self.argv = list(argv)
        self.command = shlex.join(self.argv)
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.stderr_log = Path(stderr_log) if stderr_log is not None else None
        self.proc: Optional[subprocess.Popen] = None
        self.buf = bytearray()
        self.sent = 0  # requests sent to the current process (what its own logs count)
        self._stderr: collections.deque[str] = collections.deque(maxlen=max(1, stderr_lines))
        self._stderr_thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ naming
    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def prefix(self) -> str:
        s = f"oracle program `{self.command}`"
        if self.proc is not None:
            s += f" (pid {self.proc.pid})"
        return s

    def stderr_tail(self, n: int = 5) -> str:
        if self._stderr_thread is not None and self.proc is not None and self.proc.poll() is not None:
            self._stderr_thread.join(timeout=0.5)  # the program exited: let the last lines arrive
        tail = [line[:200] for line in list(self._stderr)[-n:] if line.strip()]
        return f" | last stderr: {' / '.join(tail)}" if tail else " | (no stderr output)"

    def exit_text(self) -> str:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return "closed its stdout (still running)"
        if code < 0:
            try:
                sig = signal.Signals(-code).name
            except ValueError:
                sig = str(-code)
            return f"was killed by signal {sig}"
        return f"exited with code {code}"

    # ------------------------------------------------------------------ lifecycle
    def _drain_stderr(self, stream: Any, sink: collections.deque, log: Optional[Path]) -> None:
        f = log.open("a") if log is not None else None
        try:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                sink.append(line)
                if f is not None:
                    f.write(line + "\n")
                    f.flush()
        except (OSError, ValueError):
            pass
        finally:
            if f is not None:
                f.close()

    def start(self, startup_timeout: float) -> str:
        """Start the program and return its handshake line."""
        self.buf = bytearray()
        self.sent = 0
        self._stderr.clear()
        try:
            proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=self.cwd, env=self.env, bufsize=0,
                                    start_new_session=True)  # its own process group: kill children too
        except FileNotFoundError:
            raise Transport(f"cannot start oracle program `{self.command}`: {self.argv[0]!r} not found (check "
                            "the path or PATH; the argument list is run directly, not through a shell).") from None
        except PermissionError:
            raise Transport(f"cannot start oracle program `{self.command}`: {self.argv[0]!r} is not executable "
                            "(chmod +x it, or run it through its interpreter, e.g. ['awk', '-f', 'sim.awk']).") from None
        except OSError as e:
            raise Transport(f"cannot start oracle program `{self.command}`: {e}.") from None
        self.proc = proc
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        os.set_blocking(proc.stdin.fileno(), False)
        self._stderr_thread = threading.Thread(target=self._drain_stderr, args=(proc.stderr, self._stderr, self.stderr_log),
                                               name=f"bbzo-oracle-stderr-{proc.pid}", daemon=True)
        self._stderr_thread.start()
        try:
            return self._read_handshake(startup_timeout)
        except Transport:
            self.kill()
            raise

    def _read_handshake(self, startup_timeout: float) -> str:
        deadline = time.monotonic() + startup_timeout
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self.buf:
                if len(self.buf) > MAX_LINE:
                    raise Transport(f"{self.prefix()} is not a bbzo oracle: no handshake line in its first "
                                    f"{MAX_LINE} bytes of output ({bytes(self.buf[:60])!r}...).")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Transport(f"{self.prefix()} printed no handshake within {startup_timeout:g} s "
                                    f"(--oracle-startup-timeout; expected 'bbzo-oracle {PROTOCOL_VERSION} <d_in> <d_out> "
                                    f"<format>' as its first line; is its stdout flushed?){self.stderr_tail()}")
                if not sel.select(remaining):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise Transport(f"{self.prefix()} {self.exit_text()} before the handshake{self.stderr_tail()}")
                self.buf += chunk
        nl = self.buf.index(b"\n")
        line = bytes(self.buf[:nl]).decode("ascii", errors="replace").strip()
        del self.buf[:nl + 1]
        if self.buf:
            raise Transport(f"{self.prefix()} sent {len(self.buf)} bytes after its handshake before any query "
                            f"({bytes(self.buf[:60])!r}); the program must only answer queries.")
        return line

    def kill(self) -> None:
        """Kill the program (and its process group) now."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._close_pipes(proc)

    def _close_pipes(self, proc: subprocess.Popen) -> None:
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except (OSError, ValueError):
                pass
        if self._stderr_thread is not None:
            self._stderr_thread.join(timeout=1.0)
        try:
            if proc.stderr is not None:
                proc.stderr.close()
        except (OSError, ValueError):
            pass

    def close(self, grace: float = 2.0) -> None:
        """Ask the program to quit (``quit`` line, stdin closed); terminate, then kill, after ``grace`` s."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                assert proc.stdin is not None
                os.write(proc.stdin.fileno(), b"quit\n")
            except (OSError, ValueError, AssertionError):
                pass
            try:
                if proc.stdin is not None:
                    proc.stdin.close()
            except (OSError, ValueError):
                pass
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                for sig, wait in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0)):
                    try:
                        os.killpg(proc.pid, sig)
                    except (ProcessLookupError, PermissionError):
                        proc.send_signal(sig)
                    try:
                        proc.wait(timeout=wait)
                        break
                    except subprocess.TimeoutExpired:
                        continue
        self._close_pipes(proc)

    # ------------------------------------------------------------------ one exchange
    def _read_stray(self, fd: int) -> None:
        """Whatever the program wrote after its last answer (nothing, if it keeps to the protocol)."""
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while sel.select(0):
                chunk = os.read(fd, 1 << 16)
                if not chunk:  # exited since the last answer: the exchange below reports it
                    return
                self.buf += chunk

    def exchange(self, request: bytes, parse: Callable[[bytearray], Optional[np.ndarray]], timeout: float,
                 progress: Callable[[bytearray], str], min_lines: int = 1) -> np.ndarray:
        """Send ``request`` while reading; return ``parse(buffer)`` once it yields a complete answer.

        ``parse`` runs when the reply's first line is in (an ``error`` answer, a bad header) and then only
        once ``min_lines`` lines are (a text reply of n rows has n + 1): a line-buffered program
        answers a line per read, and parsing the buffer after each would cost O(n^2).
        """
        proc = self.proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        view = memoryview(request)
        sent = 0
        in_fd, out_fd = proc.stdin.fileno(), proc.stdout.fileno()
        self.sent += 1  # this request's number (in messages)
        self._read_stray(out_fd)
        if self.buf:
            raise Transport(f"wrong reply size: {len(self.buf)} unexpected bytes after the answer to request "
                            f"{self.sent - 1}, before this request was sent ({first_bytes(self.buf)}); log to stderr, "
                            "not stdout")
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(out_fd, selectors.EVENT_READ)
            sel.register(in_fd, selectors.EVENT_WRITE)
            lines = self.buf.count(b"\n")
            check = True
            while True:
                reply = parse(self.buf) if check else None
                if reply is not None:
                    if sent < len(view):
                        raise Transport(f"answered after reading {sent} of {len(view)} request bytes")
                    return reply
                check = False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Transport(f"no complete answer within the timeout of {timeout:g} s (--oracle-timeout; "
                                    f"{progress(self.buf)})")
                for key, _ in sel.select(remaining):
                    if key.fd == in_fd:
                        try:
                            sent += os.write(in_fd, view[sent:sent + 65536])
                        except BlockingIOError:
                            pass
                        except (BrokenPipeError, ConnectionResetError):
                            raise Transport(f"{self.exit_text()} (it stopped reading its stdin)") from None
                        if sent == len(view):
                            sel.unregister(in_fd)
                    else:
                        chunk = os.read(out_fd, 1 << 16)
                        if not chunk:
                            raise Transport(f"{self.exit_text()} ({progress(self.buf)})")
                        self.buf += chunk
                        before, lines = lines, lines + chunk.count(b"\n")
                        check = lines >= min_lines or (before == 0 and (lines > 0 or len(self.buf) > 4096))
                        if not check and len(chunk) < TRICKLE_BYTES:
                            time.sleep(TRICKLE_WAIT_S)  # a line-buffered program: let lines gather, not a wakeup each
