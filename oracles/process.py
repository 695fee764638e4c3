"""External-process oracle: any program, in any language, that speaks the bbzo oracle protocol.

The program is started once from an argument list (never through a shell) and kept running; each
:meth:`~bbzo.oracle.Oracle.query` sends one batch over its stdin and reads the answer from its stdout.
The protocol (version 1, spelled out in ``docs/custom_simulators.md``)::

    program -> bbzo   bbzo-oracle 1 <d_in> <d_out> <format>\\n     handshake, once, at start
    bbzo -> program   query <n> <d_in>\\n  + payload of n x d_in     one request per query
    program -> bbzo   ok <n> <d_out>\\n    + payload of n x d_out    its answer
                      error <message>\\n                              or: this query failed
    bbzo -> program   quit\\n  (then stdin is closed)                 on close

``<format>`` is ``text`` (one row per line, values separated by spaces; easy in awk or a shell),
``f32le`` or ``f64le`` (raw little-endian float32 / float64, row-major, no separators).

Everything that can go wrong is an :class:`~bbzo.errors.OracleError` naming the program, the query
number and its rows: the program is not found, prints no or a wrong handshake, does not answer within
``timeout`` seconds, exits, sends a malformed header, the wrong number of rows or values, or NaN/inf.
Transport failures (exit, timeout, malformed or wrong-sized reply) kill the program; with
``restarts=k`` it is restarted and the same query re-sent up to ``k`` times. An ``error`` reply and NaN
are answers, not transport failures, and are not retried. stderr is drained by a thread (so the program
can never block on it) and its last lines are quoted in every error. POSIX only (``selectors`` on pipes).
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
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from bbzo.errors import ConfigError, OracleError
from bbzo.oracle import Oracle

__all__ = ["ProcessOracle", "PROTOCOL_VERSION", "FORMATS"]

PROTOCOL_VERSION = 1
FORMATS: dict[str, Optional[np.dtype]] = {"text": None, "f32le": np.dtype("<f4"), "f64le": np.dtype("<f8")}
MAX_LINE = 4096  # a header longer than this is garbage


class _Transport(Exception):
    """The exchange broke (exit, timeout, garbage): kill the program, maybe restart and retry."""


class _Reported(Exception):
    """The program answered ``error <message>``: the stream is intact, the query failed."""


class ProcessOracle(Oracle):
    """A black box that is an external program speaking the bbzo oracle protocol (see module doc).

    Args:
        argv: Program and arguments, e.g. ``["awk", "-f", "heater.awk"]`` or ``["./sim", "--fast"]``.
            A string is refused (use ``shlex.split``): nothing is ever run through a shell.
        timeout: Seconds to wait for one query's complete answer.
        startup_timeout: Seconds to wait for the handshake line after starting the program.
        restarts: On a transport failure, restart the program and re-send the query up to this many
            times (per query) before raising.
        cwd, env: Working folder and environment of the program (default: inherited).
        stderr_lines: How many of the program's last stderr lines to keep for error messages.
        stderr_log: Optional file that receives all of the program's stderr (appended).
        name, max_rows, max_calls: As :class:`~bbzo.oracle.Oracle` (``name`` defaults to the command).

    Attributes:
        d_in, d_out, format: What the program declared in its handshake.
        restarts_used: How many times the program was restarted after a failure.
    """

    def __init__(
        self,
        argv: Sequence[Union[str, os.PathLike]],
        *,
        timeout: float = 60.0,
        startup_timeout: float = 30.0,
        restarts: int = 0,
        cwd: Optional[Union[str, os.PathLike]] = None,
        env: Optional[Mapping[str, str]] = None,
        stderr_lines: int = 20,
        stderr_log: Optional[Union[str, os.PathLike]] = None,
        name: Optional[str] = None,
        max_rows: Optional[int] = None,
        max_calls: Optional[int] = None,
    ) -> None:
        if isinstance(argv, (str, bytes)):
            raise ConfigError(
                f"ProcessOracle takes an argument list, not a string ({argv!r}); nothing is run through a "
                f"shell. Use e.g. shlex.split({argv!r}) -> {shlex.split(argv) if isinstance(argv, str) else '...'}."
            )
        self.argv = [os.fspath(a) for a in argv]
        if not self.argv:
            raise ConfigError("ProcessOracle needs a program to run; argv is empty.")
        if not timeout > 0 or not startup_timeout > 0:
            raise ConfigError(f"timeouts must be > 0, got timeout={timeout}, startup_timeout={startup_timeout}.")
        if restarts < 0:
            raise ConfigError(f"restarts must be >= 0, got {restarts}.")
        self.command = shlex.join(self.argv)
        super().__init__(name=name or (self.command if len(self.command) <= 80 else self.command[:77] + "..."),
                         max_rows=max_rows, max_calls=max_calls)
        self.timeout, self.startup_timeout, self.restarts = float(timeout), float(startup_timeout), int(restarts)
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.stderr_log = Path(stderr_log) if stderr_log is not None else None
        self.restarts_used = 0
        self.d_in = self.d_out = 0
        self.format = ""
        self._stderr: collections.deque[str] = collections.deque(maxlen=max(1, stderr_lines))
        self._proc: Optional[subprocess.Popen] = None
        self._stderr_thread: Optional[threading.Thread] = None
        self._buf = bytearray()
        self._sent = 0  # requests sent to the current process (what its own logs count)
        try:
            self._start()
        except _Transport as e:
            raise OracleError(str(e)) from None

    # ------------------------------------------------------------------ process lifecycle
    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _prefix(self, query: Optional[int] = None, rows: Optional[int] = None, sent: bool = True) -> str:
        s = f"oracle program `{self.command}`"
        if self._proc is not None:
            s += f" (pid {self._proc.pid})"
        if query is not None:
            s += f", query #{query} ({rows} rows" + (f", request {self._sent} to this process)" if sent else ")")
        return s

    def _stderr_tail(self, n: int = 5) -> str:
        if self._stderr_thread is not None and self._proc is not None and self._proc.poll() is not None:
            self._stderr_thread.join(timeout=0.5)  # the program exited: let the last lines arrive
        tail = [line[:200] for line in list(self._stderr)[-n:] if line.strip()]
        return f" | last stderr: {' / '.join(tail)}" if tail else " | (no stderr output)"

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

    def _start(self) -> None:
        self._buf = bytearray()
        self._sent = 0
        self._stderr.clear()
        try:
            proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, cwd=self.cwd, env=self.env, bufsize=0,
                                    start_new_session=True)  # its own process group: kill children too
        except FileNotFoundError:
            raise _Transport(f"cannot start oracle program `{self.command}`: {self.argv[0]!r} not found (check "
                             "the path or PATH; the argument list is run directly, not through a shell).") from None
        except PermissionError:
            raise _Transport(f"cannot start oracle program `{self.command}`: {self.argv[0]!r} is not executable "
                             "(chmod +x it, or run it through its interpreter, e.g. ['awk', '-f', 'sim.awk']).") from None
        except OSError as e:
            raise _Transport(f"cannot start oracle program `{self.command}`: {e}.") from None
        self._proc = proc
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        os.set_blocking(proc.stdin.fileno(), False)
        self._stderr_thread = threading.Thread(target=self._drain_stderr, args=(proc.stderr, self._stderr, self.stderr_log),
                                               name=f"bbzo-oracle-stderr-{proc.pid}", daemon=True)
        self._stderr_thread.start()
        try:
            line = self._read_handshake()
            self._parse_handshake(line)
        except _Transport:
            self._kill()
            raise

    def _read_handshake(self) -> str:
        deadline = time.monotonic() + self.startup_timeout
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                if len(self._buf) > MAX_LINE:
                    raise _Transport(f"{self._prefix()} is not a bbzo oracle: no handshake line in its first "
                                     f"{MAX_LINE} bytes of output ({bytes(self._buf[:60])!r}...).")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _Transport(f"{self._prefix()} printed no handshake within {self.startup_timeout:g} s "
                                     f"(expected 'bbzo-oracle {PROTOCOL_VERSION} <d_in> <d_out> <format>' as its first "
                                     f"line; is its stdout flushed?){self._stderr_tail()}")
                if not sel.select(remaining):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise _Transport(f"{self._prefix()} {self._exit_text()} before the handshake{self._stderr_tail()}")
                self._buf += chunk
        nl = self._buf.index(b"\n")
        line = bytes(self._buf[:nl]).decode("ascii", errors="replace").strip()
        del self._buf[:nl + 1]
        if self._buf:
            raise _Transport(f"{self._prefix()} sent {len(self._buf)} bytes after its handshake before any query "
                             f"({bytes(self._buf[:60])!r}); the program must only answer queries.")
        return line

    def _parse_handshake(self, line: str) -> None:
        expected = f"'bbzo-oracle {PROTOCOL_VERSION} <d_in> <d_out> <format>' with format one of {', '.join(FORMATS)}"
        parts = line.split()
        if not parts or parts[0] != "bbzo-oracle":
            raise _Transport(f"{self._prefix()} is not a bbzo oracle: its first line was {line[:120]!r}, expected "
                             f"{expected}.{self._stderr_tail()}")
        if len(parts) >= 2 and parts[1] != str(PROTOCOL_VERSION):
            raise _Transport(f"{self._prefix()} speaks bbzo oracle protocol version {parts[1]!r}; this bbzo speaks "
                             f"version {PROTOCOL_VERSION}.")
        if len(parts) != 5:
            raise _Transport(f"{self._prefix()}: malformed handshake {line[:120]!r}, expected {expected}.")
        try:
            d_in, d_out = int(parts[2]), int(parts[3])
        except ValueError:
            d_in = d_out = 0
        if d_in < 1 or d_out < 1:
            raise _Transport(f"{self._prefix()}: handshake {line[:120]!r} must declare d_in and d_out as "
                             "positive integers.")
        if parts[4] not in FORMATS:
            raise _Transport(f"{self._prefix()}: handshake declares unknown format {parts[4]!r}; use one of "
                             f"{', '.join(FORMATS)}.")
        if self.format and (d_in, d_out, parts[4]) != (self.d_in, self.d_out, self.format):
            raise _Transport(f"{self._prefix()} restarted with a different handshake {line!r} (was "
                             f"d_in={self.d_in}, d_out={self.d_out}, format={self.format}).")
        self.d_in, self.d_out, self.format = d_in, d_out, parts[4]
        self.input_shape, self.output_shape = (d_in,), (d_out,)

    def _exit_text(self) -> str:
        assert self._proc is not None
        try:
            code = self._proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return "closed its stdout (still running)"
        if code < 0:
            try:
                sig = signal.Signals(-code).name
            except ValueError:
                sig = str(-code)
            return f"was killed by signal {sig}"
        return f"exited with code {code}"

    def _kill(self) -> None:
        """Kill the program (and its process group) now; the next query starts a fresh one."""
        proc, self._proc = self._proc, None
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
        proc, self._proc = self._proc, None
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

    def __enter__(self) -> "ProcessOracle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close(grace=0.5)
        except Exception:  # noqa: BLE001, S110 -- interpreter shutdown: nothing left to report to
            pass

    # ------------------------------------------------------------------ one query
    def _encode(self, arr: np.ndarray) -> bytes:
        n, d = arr.shape
        header = f"query {n} {d}\n".encode()
        dtype = FORMATS[self.format]
        if dtype is None:
            body = "".join(" ".join(map(repr, row)) + "\n" for row in arr.tolist())
            return header + body.encode()
        return header + np.ascontiguousarray(arr, dtype=dtype).tobytes()

    def _parse_reply(self, n: int) -> Optional[np.ndarray]:
        """The complete reply in the buffer, or None if more bytes are needed. Raises on garbage."""
        buf = self._buf
        nl = buf.find(b"\n")
        if nl < 0:
            if len(buf) > MAX_LINE:
                raise _Transport(f"malformed reply: no header line in the first {MAX_LINE} bytes "
                                 f"({bytes(buf[:60])!r}...)")
            return None
        line = bytes(buf[:nl]).decode("ascii", errors="replace").strip()
        parts = line.split()
        if parts[:1] == ["error"]:
            del buf[:nl + 1]
            raise _Reported(line[len("error"):].strip() or "(no message)")
        try:
            if len(parts) != 3 or parts[0] != "ok":
                raise ValueError
            rn, rd = int(parts[1]), int(parts[2])
        except ValueError:
            raise _Transport(f"malformed reply header {line[:120]!r}; expected 'ok {n} {self.d_out}' "
                             "(or 'error <message>')") from None
        if rn != n:
            raise _Transport(f"wrong number of rows: the reply header says {rn} rows for a query of {n} rows")
        if rd != self.d_out:
            raise _Transport(f"wrong row size: the reply header says {rd} values per row, the handshake "
                             f"declared d_out={self.d_out}")
        start = nl + 1
        dtype = FORMATS[self.format]
        if dtype is not None:
            need = n * rd * dtype.itemsize
            if len(buf) - start < need:
                return None
            out = np.frombuffer(bytes(buf[start:start + need]), dtype=dtype).astype(np.float64).reshape(n, rd)
            end = start + need
        else:
            end = start
            for _ in range(n):
                j = buf.find(b"\n", end)
                if j < 0:
                    return None
                end = j + 1
            out = self._parse_text_rows(bytes(buf[start:end]).decode("ascii", errors="replace").splitlines(), rd)
        if len(buf) > end:
            raise _Transport(f"wrong reply size: {len(buf) - end} unexpected bytes after the {n} rows of the reply "
                             f"({bytes(buf[end:end + 40])!r})")
        self._buf = bytearray()
        return out

    @staticmethod
    def _parse_text_rows(lines: list[str], d: int) -> np.ndarray:
        rows = [line.split() for line in lines]
        for i, toks in enumerate(rows):
            if len(toks) != d:
                raise _Transport(f"wrong row size: reply row {i} has {len(toks)} values, expected {d}: {lines[i][:80]!r}")
        try:
            return np.array(rows, dtype=np.float64).reshape(len(rows), d)
        except ValueError:
            for i, toks in enumerate(rows):
                for t in toks:
                    try:
                        float(t)
                    except ValueError:
                        raise _Transport(f"malformed reply: row {i} holds {t[:40]!r}, which is not a number") from None
            raise

    def _progress_text(self, n: int) -> str:
        buf = self._buf
        if not buf:
            return "nothing received"
        nl = buf.find(b"\n")
        if nl < 0:
            return f"received {len(buf)} bytes of the header"
        head = bytes(buf[:nl]).decode("ascii", errors="replace").strip()[:60]
        body = len(buf) - nl - 1
        dtype = FORMATS[self.format]
        rows = body // (dtype.itemsize * self.d_out) if dtype is not None else buf.count(b"\n", nl + 1)
        got = f"{rows} of {n} rows"
        return f"received the header {head!r} and {got}"

    def _read_stray(self, fd: int) -> None:
        """Whatever the program wrote after its last answer (nothing, if it keeps to the protocol)."""
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while sel.select(0):
                chunk = os.read(fd, 1 << 16)
                if not chunk:  # exited since the last answer: the exchange below reports it
                    return
                self._buf += chunk

    def _exchange(self, arr: np.ndarray, query: int) -> np.ndarray:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        n = arr.shape[0]
        request = memoryview(self._encode(arr))
        sent = 0
        in_fd, out_fd = proc.stdin.fileno(), proc.stdout.fileno()
        self._read_stray(out_fd)
        if self._buf:
            raise _Transport(f"wrong reply size: {len(self._buf)} unexpected bytes after the previous answer, before this "
                             f"query was sent ({bytes(self._buf[:40])!r}); log to stderr, not stdout")
        self._sent += 1
        deadline = time.monotonic() + self.timeout
        with selectors.DefaultSelector() as sel:
            sel.register(out_fd, selectors.EVENT_READ)
            sel.register(in_fd, selectors.EVENT_WRITE)
            while True:
                reply = self._parse_reply(n)
                if reply is not None:
                    if sent < len(request):
                        raise _Transport(f"answered after reading {sent} of {len(request)} request bytes")
                    return reply
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _Transport(f"no complete answer within the timeout of {self.timeout:g} s "
                                     f"({self._progress_text(n)})")
                for key, _ in sel.select(remaining):
                    if key.fd == in_fd:
                        try:
                            sent += os.write(in_fd, request[sent:sent + 65536])
                        except BlockingIOError:
                            pass
                        except (BrokenPipeError, ConnectionResetError):
                            raise _Transport(f"{self._exit_text()} (it stopped reading its stdin)") from None
                        if sent == len(request):
                            sel.unregister(in_fd)
                    else:
                        chunk = os.read(out_fd, 1 << 16)
                        if not chunk:
                            raise _Transport(f"{self._exit_text()} ({self._progress_text(n)})")
                        self._buf += chunk

    def _query(self, inputs: torch.Tensor) -> torch.Tensor:
        n = int(inputs.shape[0])
        query = self.calls_used + 1
        arr = inputs.detach().reshape(n, -1).to("cpu", torch.float64).numpy()
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr).all(axis=1)).sum())
            raise OracleError(f"{self._prefix(query, n, sent=False)}: {bad} input rows hold NaN/inf; not sent (the model "
                              "upstream of the oracle diverged: lower the learning rate or mu).")
        attempt = 0
        while True:
            try:
                if self._proc is None:
                    self._start()
                out = self._exchange(arr, query)
                break
            except _Reported as e:
                raise OracleError(f"{self._prefix(query, n)} answered with an error: {e}{self._stderr_tail()}") from None
            except _Transport as e:
                msg = f"{self._prefix(query, n)}: {e}{self._stderr_tail()}"
                self._kill()
                if attempt < self.restarts:
                    attempt += 1
                    self.restarts_used += 1
                    continue
                hint = (f" (gave up after {attempt} restart{'s' if attempt != 1 else ''})" if attempt
                        else " (restart and retry with restarts=N / --oracle-restarts N)")
                raise OracleError(msg + hint) from None
        finite = np.isfinite(out).all(axis=1)
        if not finite.all():
            first = int(np.flatnonzero(~finite)[0])
            shown = ", ".join(f"{v:.6g}" for v in arr[first, :8]) + (", ..." if arr.shape[1] > 8 else "")
            raise OracleError(f"{self._prefix(query, n)} returned NaN/inf in {int((~finite).sum())} of {n} rows "
                              f"(first bad row {first}, its input [{shown}]). The simulator failed on those inputs: "
                              "are they in its valid range, is mu too large?")
        return torch.from_numpy(out).to(device=inputs.device, dtype=inputs.dtype)

    def __repr__(self) -> str:
        return (f"ProcessOracle({self.argv!r}, d_in={self.d_in}, d_out={self.d_out}, format={self.format!r}, "
                f"rows_used={self.rows_used}, calls_used={self.calls_used}, restarts_used={self.restarts_used})")
