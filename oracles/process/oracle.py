"""``ProcessOracle``: any program, in any language, that speaks the bbzo oracle protocol.

The program is started once and kept running; each :meth:`~bbzo.oracle.Oracle.query` sends one batch
over its stdin and reads the answer from its stdout (:mod:`.protocol` is the codec, :mod:`.pipe` the
process). Everything that can go wrong is an :class:`~bbzo.errors.OracleError` naming the program, the
query number and its rows: the program is not found, prints no or a wrong handshake, does not answer
within ``timeout`` seconds, exits, sends a malformed header, the wrong number of rows or values, or
NaN/inf. Transport failures (exit, timeout, malformed or wrong-sized reply) kill the program; with
``restarts=k`` it is restarted and the same query re-sent up to ``k`` times. An ``error`` reply and NaN
are answers, not transport failures, and are not retried.
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from bbzo.errors import ConfigError, OracleError
from bbzo.oracle import Oracle

from .pipe import Program
from .protocol import (Reported, Transport, encode_query, handshake_capabilities, parse_handshake, parse_reply,
                       progress_text)

__all__ = ["ProcessOracle"]


class ProcessOracle(Oracle):
    """A black box that is an external program speaking the bbzo oracle protocol.

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
        name, max_rows, max_calls, max_batch: As :class:`~bbzo.oracle.Oracle` (``name`` defaults to the command).

    Attributes:
        d_in, d_out, format: What the program declared in its handshake.
        capabilities: The optional protocol features it declared (``{"seed"}``: it takes a common-random-numbers
            seed, so :attr:`accepts_seed`).
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
        max_batch: Optional[int] = None,
    ) -> None:
        if isinstance(argv, (str, bytes)):
            raise ConfigError(
                f"ProcessOracle takes an argument list, not a string ({argv!r}); nothing is run through a "
                f"shell. Use e.g. shlex.split({argv!r}) -> {shlex.split(argv) if isinstance(argv, str) else '...'}."
            )
        args = [os.fspath(a) for a in argv]
        if not args:
            raise ConfigError("ProcessOracle needs a program to run; argv is empty.")
        if not timeout > 0 or not startup_timeout > 0:
            raise ConfigError(f"timeouts must be > 0, got timeout={timeout}, startup_timeout={startup_timeout}.")
        if restarts < 0:
            raise ConfigError(f"restarts must be >= 0, got {restarts}.")
        self.program = Program(args, cwd=cwd, env=env, stderr_lines=stderr_lines, stderr_log=stderr_log)
        self.argv, self.command = self.program.argv, self.program.command
        super().__init__(name=name or (self.command if len(self.command) <= 80 else self.command[:77] + "..."),
                         max_rows=max_rows, max_calls=max_calls, max_batch=max_batch)
        self.timeout, self.startup_timeout, self.restarts = float(timeout), float(startup_timeout), int(restarts)
        self.restarts_used = 0
        self.restart_log: list[str] = []
        self.d_in = self.d_out = 0
        self.format = ""
        self.capabilities: frozenset[str] = frozenset()
        try:
            self._start()
        except Transport as e:
            raise OracleError(str(e)) from None

    # ------------------------------------------------------------------ process
    @property
    def pid(self) -> Optional[int]:
        return self.program.pid

    @property
    def alive(self) -> bool:
        return self.program.alive

    @property
    def _proc(self) -> Any:
        return self.program.proc

    def _start(self) -> None:
        line = self.program.start(self.startup_timeout)
        try:
            previous = (self.d_in, self.d_out, self.format) if self.format else None
            self.d_in, self.d_out, self.format = parse_handshake(line, prefix=self.program.prefix(),
                                                                 tail=self.program.stderr_tail(), previous=previous)
            caps = handshake_capabilities(line)
            if previous is not None and caps != self.capabilities:
                raise Transport(f"{self.program.prefix()} restarted with a different handshake {line!r} (capabilities "
                                f"{' '.join(sorted(caps)) or 'none'}, were {' '.join(sorted(self.capabilities)) or 'none'}).")
        except Transport:
            self.program.kill()
            raise
        self.capabilities = caps
        self.input_shape, self.output_shape = (self.d_in,), (self.d_out,)

    @property
    def accepts_seed(self) -> bool:
        """Whether the program declared the ``seed`` capability in its handshake (protocol 1.2)."""
        return "seed" in self.capabilities

    def _prefix(self, call: str, sent: bool = True) -> str:
        """``oracle program `cmd` (pid 12), call #50 (step 25, 1088 rows; request 51 to this process)``."""
        s = f"{self.program.prefix()}, {call}"
        return s[:-1] + f"; request {self.program.sent} to this process)" if sent else s

    def _report_restart(self, reason: str, attempt: int) -> None:
        """A restart is never silent: one line on the console and in the stderr log, kept for the summary."""
        hang = " Each hang costs the whole --oracle-timeout." if "timeout" in reason else ""
        line = f"bbzo: {reason} -> restarting the program (restart {attempt} of {self.restarts}).{hang}"
        self.restart_log.append(line)
        print(line, file=sys.stderr, flush=True)
        if self.program.stderr_log is not None:
            with open(self.program.stderr_log, "a") as f:
                f.write(line + "\n")

    def close(self, grace: float = 2.0) -> None:
        """Ask the program to quit (``quit`` line, stdin closed); terminate, then kill, after ``grace`` s."""
        self.program.close(grace)

    def __enter__(self) -> "ProcessOracle":
        return self

    def __del__(self) -> None:
        try:
            self.program.close(grace=0.5)
        except Exception:  # noqa: BLE001, S110 -- interpreter shutdown: nothing left to report to
            pass

    # ------------------------------------------------------------------ one query
    def _query(self, inputs: torch.Tensor, seed: Optional[int] = None) -> torch.Tensor:
        n = int(inputs.shape[0])
        call = self.call_label(n)
        arr = inputs.detach().reshape(n, -1).to("cpu", torch.float64).numpy()
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr).all(axis=1)).sum())
            raise OracleError(f"{self._prefix(call, sent=False)}: {bad} input rows hold NaN/inf; not sent (the model "
                              "upstream of the oracle diverged: lower the learning rate or mu).")
        attempt = 0
        while True:
            try:
                if self.program.proc is None:
                    self._start()
                out = self.program.exchange(encode_query(arr, self.format, seed if self.accepts_seed else None),
                                            lambda buf: parse_reply(buf, n, self.d_out, self.format), self.timeout,
                                            lambda buf: progress_text(buf, n, self.d_out, self.format),
                                            min_lines=n + 1 if self.format == "text" else 1)
                break
            except Reported as e:
                raise OracleError(f"{self._prefix(call)} answered with an error: {e}{self.program.stderr_tail()}") from None
            except Transport as e:
                msg = f"{self._prefix(call)}: {e}{self.program.stderr_tail()}"
                first_call = self.calls_used + self.ledger.account(self).eval_calls == 0
                self.program.kill()
                if attempt < self.restarts:
                    attempt += 1
                    self.restarts_used += 1
                    self._report_restart(msg, attempt)
                    continue
                if attempt:
                    hint = f" (gave up after {attempt} restart{'s' if attempt != 1 else ''})"
                elif first_call:  # it failed before answering anything: a restart would fail the same way
                    hint = " (it failed on its first call: check that it speaks the protocol; restarting would not help)"
                else:
                    hint = " (if the failure is transient, --oracle-restarts N restarts the program and re-sends the call)"
                raise OracleError(msg + hint) from None
        finite = np.isfinite(out).all(axis=1)
        if not finite.all() and not self.answers_failures_with_nan:
            first = int(np.flatnonzero(~finite)[0])
            shown = ", ".join(f"{v:.6g}" for v in arr[first, :8]) + (", ..." if arr.shape[1] > 8 else "")
            raise OracleError(f"{self._prefix(call)} returned NaN/inf in {int((~finite).sum())} of {n} rows "
                              f"(first bad row {first}, its input [{shown}]). The simulator failed on those inputs: "
                              "are they in its valid range, is mu too large? (--on-oracle-error penalize|skip carries "
                              f"on without such rows){self.program.stderr_tail()}")
        return torch.from_numpy(out).to(device=inputs.device, dtype=inputs.dtype)

    def __repr__(self) -> str:
        return (f"ProcessOracle({self.argv!r}, d_in={self.d_in}, d_out={self.d_out}, format={self.format!r}, "
                f"capabilities={sorted(self.capabilities)}, "
                f"rows_used={self.rows_used}, calls_used={self.calls_used}, restarts_used={self.restarts_used})")
