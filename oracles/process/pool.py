"""``ProcessPool``: N copies of an oracle program, each call's rows split across them.

A single-threaded simulator then uses every core: the rows of a call are cut into ``N`` contiguous parts
in order, each copy answers its part (one thread per copy drives its pipes; the program does the
work), and the answers are put back together in row order, so the result is exactly what one copy
would have answered. Every copy is a :class:`~.oracle.ProcessOracle` with its own handshake, timeout,
restarts and stderr, so faults and restarts work per copy; the pool's ledger counts each row once.
"""

from __future__ import annotations

import contextvars
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence, Union

import torch

from bbzo.errors import ConfigError, OracleError
from bbzo.oracle import Oracle

from .oracle import ProcessOracle

__all__ = ["ProcessPool"]


class ProcessPool(Oracle):
    """``workers`` copies of an oracle program behind one :class:`~bbzo.oracle.Oracle`.

    Args:
        argv: Program and arguments, as :class:`~.oracle.ProcessOracle`.
        workers: Copies to start (>= 1).
        min_rows: Calls with fewer rows per copy than this go to the first copy alone (splitting tiny
            calls costs more than it saves).
        stderr_log: One file for every copy's stderr (each line as the program wrote it).
        name, max_rows, max_calls, max_batch: As :class:`~bbzo.oracle.Oracle`.
        **kw: Passed to every copy (``timeout``, ``startup_timeout``, ``restarts``, ``cwd``, ``env``).
    """

    def __init__(self, argv: Sequence[Union[str, os.PathLike]], workers: int = 2, *, min_rows: int = 16,
                 stderr_log: Optional[Union[str, os.PathLike]] = None, name: Optional[str] = None,
                 max_rows: Optional[int] = None, max_calls: Optional[int] = None, max_batch: Optional[int] = None,
                 **kw: Any) -> None:
        if workers < 1:
            raise ConfigError(f"ProcessPool needs workers >= 1, got {workers}.")
        self.copies: list[ProcessOracle] = []
        try:
            for i in range(workers):
                self.copies.append(ProcessOracle(argv, stderr_log=stderr_log, name=f"copy {i + 1}/{workers}", **kw))
        except BaseException:
            self.close()
            raise
        first = self.copies[0]
        super().__init__(name=name or (first.command if len(first.command) <= 70 else first.command[:67] + "...")
                         + (f" x{workers}" if workers > 1 else ""), max_rows=max_rows, max_calls=max_calls,
                         max_batch=max_batch, input_shape=first.input_shape, output_shape=first.output_shape)
        self.workers, self.min_rows = workers, int(min_rows)
        self.d_in, self.d_out, self.format = first.d_in, first.d_out, first.format
        self._threads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bbzo-oracle-pool") if workers > 1 else None

    @property
    def restarts_used(self) -> int:
        return sum(c.restarts_used for c in self.copies)

    @property
    def restart_log(self) -> list[str]:
        return [line for c in self.copies for line in c.restart_log]

    @property
    def accepts_seed(self) -> bool:
        """Whether the program declared the ``seed`` capability (every copy runs the same program)."""
        return self.copies[0].accepts_seed

    def _query(self, inputs: torch.Tensor, seed: Optional[int] = None) -> torch.Tensor:
        # the copies read the common-random-numbers seed of the calling context themselves (``seed`` is that seed):
        # each thread runs its part in a copy of this context, so every copy gets the same seed
        n = int(inputs.shape[0])
        parts = min(self.workers, max(1, n // max(1, self.min_rows)))
        if parts == 1 or self._threads is None:
            return self.copies[0].query(inputs)
        bounds = [(n * i) // parts for i in range(parts + 1)]
        jobs = [self._threads.submit(contextvars.copy_context().run, self.copies[i].query, inputs[bounds[i]:bounds[i + 1]])
                for i in range(parts)]
        answers, failure = [], None
        for i, job in enumerate(jobs):
            try:
                answers.append(job.result())
            except OracleError as e:  # the first failing part (in row order) names its copy and rows
                if failure is None:
                    failure = OracleError(f"{self.name}, rows {bounds[i]}..{bounds[i + 1] - 1} of {n}: {e}")
        if failure is not None:
            raise failure
        return torch.cat(answers)

    def close(self, grace: float = 2.0) -> None:
        for c in self.copies:
            c.close(grace)
        pool = getattr(self, "_threads", None)
        if pool is not None:
            pool.shutdown(wait=True)
            self._threads = None

    def __repr__(self) -> str:
        return f"ProcessPool({self.copies[0].argv!r}, workers={self.workers}, rows_used={self.rows_used})"
