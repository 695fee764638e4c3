"""Executors: who evaluates the probes of a step.

An estimator asks for probes and is told their losses; an *executor* stands between, evaluating them:

* :class:`SerialExecutor` -- this process evaluates every probe (optionally as ``n_shards`` consecutive
  shards, the same numbers): the default.
* :class:`DistributedExecutor` -- the probes are split across the ranks of a ``torch.distributed``
  process group. Every rank knows every probe (``ask`` is deterministic), evaluates its own shard, and
  **one** ``all_gather`` brings every rank the losses of all shards, the base loss (evaluated once, by
  rank 0), each rank's query-ledger and failure counts for the step, and its status. There is no master:
  every rank then runs the same ``tell`` and the same optimizer step.

**Shards are balanced by cost without a cost table.** With feature reuse a coordinate's cost depends on
its tensor (an early-layer coordinate re-runs most of the network, a late one almost nothing), so each
rank gets an equal share of *every* tensor's probes (:func:`assign_shards`), contiguous inside the tensor
(the channel path keeps its runs of consecutive coordinates). Whatever each tensor costs, every shard then
costs ``1/M`` of the step, up to one probe per tensor; the odd probes are dealt round-robin.

**Faults.** A rank whose evaluation raises reports the error in the gather, and every rank raises it
(same type, naming the rank and step). A rank that died or hangs makes the gather fail within the
process group's timeout (``--worker-timeout``); each rank posts a heartbeat in the rendezvous store
before the gather, so the others name the missing rank(s) in a :class:`~bbzo.errors.WorkerError`.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from .. import errors as _errors
from ..errors import ConfigError, WorkerError
from ..failures import SkipSamples
from ..probes import Probes, concat_losses
from .context import DistContext, current, protect_sigterm

__all__ = ["Executor", "SerialExecutor", "evaluate_sharded", "DistributedExecutor", "assign_shards", "as_executor", "default_executor"]


class Executor:
    """Evaluates a step's probes: ``(base loss or None, losses (M,) float64 in probe order)``."""

    world: int = 1
    rank: int = 0

    def evaluate(self, evaluator: Any, probes: Probes, need_base: bool) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        raise NotImplementedError


def evaluate_sharded(evaluator: Any, probes: Probes, n_shards: int = 1) -> torch.Tensor:
    """Evaluate ``probes`` as ``n_shards`` independent shards and combine them exactly.

    Each shard is self-contained (a slice of small index tensors), so the same call works when shards
    run on other processes or machines (:class:`DistributedExecutor`).
    """
    if n_shards < 1:
        raise ConfigError(f"n_shards must be >= 1, got {n_shards}.")
    return concat_losses([evaluator.evaluate(probes.shard(i, n_shards)) for i in range(n_shards)])


class SerialExecutor(Executor):
    """Every probe in this process, as ``n_shards`` consecutive shards (the numbers do not depend on it)."""

    def __init__(self, n_shards: int = 1) -> None:
        if n_shards < 1:
            raise ConfigError(f"n_shards must be >= 1, got {n_shards}.")
        self.n_shards = int(n_shards)

    def evaluate(self, evaluator: Any, probes: Probes, need_base: bool) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        base = evaluator.base_loss() if need_base else None
        return base, evaluate_sharded(evaluator, probes, self.n_shards)

    def __repr__(self) -> str:
        return f"SerialExecutor(n_shards={self.n_shards})"


def assign_shards(probes: Probes, world: int, quantum: Optional[int] = None) -> list[torch.Tensor]:
    """The probe rows ``(M_r,)`` (sorted, int64) that each of ``world`` ranks evaluates.

    ``quantum``: an evaluator without feature reuse (every probe costs the same) evaluates the probes in
    batched calls of ``quantum``; whole calls are dealt round-robin (from rank 1: rank 0 also evaluates
    the base query), so every call holds the probes a serial run's call holds. Otherwise every tensor's
    probes are split into ``world`` contiguous parts of equal size (the odd probes round-robin): with
    feature reuse a probe's cost is its tensor's, so every shard costs ``1/world`` of the step.
    """
    if world < 1:
        raise ConfigError(f"world size must be >= 1, got {world}.")
    if quantum is not None and quantum >= 1:
        calls = torch.arange(len(probes)).split(int(quantum))
        dealt: list[list[torch.Tensor]] = [[] for _ in range(world)]
        for j, rows in enumerate(calls):
            dealt[(1 + j) % world].append(rows)
        return [torch.cat(p) if p else torch.zeros(0, dtype=torch.int64) for p in dealt]
    groups = probes.tensor_groups()
    rows_list = [torch.arange(len(probes))] if groups is None else [rows for _, rows in groups]
    parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    offset = 1 % world
    for rows in rows_list:
        n = int(rows.numel())
        q, r = divmod(n, world)
        start = 0
        for j in range(world):
            size = q + (1 if j < r else 0)
            parts[(offset + j) % world].append(rows[start:start + size])
            start += size
        offset = (offset + r) % world
    out = []
    for p in parts:
        cat = torch.cat(p) if p else torch.zeros(0, dtype=torch.int64)
        out.append(torch.sort(cat.to(torch.int64)).values)
    return out


def _ledger_vector(ledger: Any) -> list[float]:
    v = [float(ledger.queries), float(ledger.eval_queries)]
    for name in sorted(ledger.accounts):
        a = ledger.accounts[name]
        v += [float(a.rows), float(a.calls), float(a.eval_rows), float(a.eval_calls)]
    return v


def _set_ledger(ledger: Any, vec: Sequence[float]) -> None:
    ledger.queries, ledger.eval_queries = int(vec[0]), int(vec[1])
    for i, name in enumerate(sorted(ledger.accounts)):
        a = ledger.accounts[name]
        a.rows, a.calls, a.eval_rows, a.eval_calls = (int(x) for x in vec[2 + 4 * i: 6 + 4 * i])


_OK, _ERROR, _SKIP = 0.0, 1.0, 2.0


class DistributedExecutor(Executor):
    """Shards the probes of every step across the ranks of the process group (see the module docstring).

    Args:
        ctx: The :class:`~bbzo.parallel.context.DistContext` (default: this process's).

    Attributes:
        last_busy: Seconds each rank spent evaluating its shard in the last call (the cost balance).
        last_sizes: Probes per rank in the last call.
    """

    def __init__(self, ctx: Optional[DistContext] = None) -> None:
        ctx = ctx or current()
        if ctx is None:
            raise ConfigError("DistributedExecutor needs a process group: start the run with torchrun or --workers M.")
        self.ctx = ctx
        self.world, self.rank = ctx.world, ctx.rank
        self.calls = 0
        self.last_busy: list[float] = []
        self.last_sizes: list[int] = []

    def _key(self, kind: str, call: int, rank: int) -> str:
        return f"bbzo/{kind}/{call}/{rank}"

    def evaluate(self, evaluator: Any, probes: Probes, need_base: bool) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        ctx, w, me = self.ctx, self.world, self.rank
        call = self.calls
        self.calls += 1
        quantum = evaluator.shard_quantum(probes) if hasattr(evaluator, "shard_quantum") else None
        parts = assign_shards(probes, w, quantum)
        mine = parts[me]
        ledger, failures = evaluator.ledger, getattr(evaluator, "failures", None)
        step = ledger.step
        led0 = _ledger_vector(ledger)
        fail0 = failures.failed_rows if failures is not None else 0
        status, base_v, local, skip, err = _OK, math.nan, torch.zeros(0, dtype=torch.float64), None, None
        t0 = time.perf_counter()
        try:
            if need_base and me == 0:
                base_v = float(evaluator.base_loss())
            if len(mine):
                local = evaluator.evaluate(probes.select(mine)).to(torch.float64).cpu()
        except SkipSamples as e:
            status, skip = _SKIP, e.samples
        except Exception as e:  # noqa: BLE001 -- reported to every rank, re-raised below
            status, err = _ERROR, e
        busy = time.perf_counter() - t0
        batch = int(evaluator.batch)
        led_d = [a - b for a, b in zip(_ledger_vector(ledger), led0)]
        fail_d = (failures.failed_rows if failures is not None else 0) - fail0
        width = max(int(p.numel()) for p in parts)
        vec = torch.full((5 + len(led_d) + batch + width,), math.nan, dtype=torch.float64)
        vec[:5] = torch.tensor([status, base_v, float(len(mine)), busy, float(fail_d)], dtype=torch.float64)
        vec[5:5 + len(led_d)] = torch.tensor(led_d, dtype=torch.float64)
        mask = torch.zeros(batch, dtype=torch.float64)
        if skip is not None:
            mask[skip.cpu()] = 1.0
        o = 5 + len(led_d)
        vec[o:o + batch] = mask
        if status == _OK and local.numel():
            vec[o + batch:o + batch + local.numel()] = local
        with protect_sigterm():
            if err is not None:
                ctx.store.set(self._key("error", call, me), f"{type(err).__name__}: {err}"[:4000])
            ctx.store.set(self._key("done", call, me), "1")
            gathered = self._gather(vec, call, step)
        self.last_busy = [float(g[3]) for g in gathered]
        self.last_sizes = [int(p.numel()) for p in parts]
        # every rank's ledger and failure counts become the sums over the ranks (the queries were spent)
        total = torch.stack([g[5:5 + len(led_d)] for g in gathered]).sum(0)
        _set_ledger(ledger, [a + float(b) for a, b in zip(led0, total.tolist())])
        if failures is not None:
            others = sum(float(g[4]) for g in gathered) - fail_d
            failures.failed_rows += int(others)
            failures.total_failed_rows += int(others)
        statuses = [float(g[0]) for g in gathered]
        if _ERROR in statuses:
            bad = statuses.index(_ERROR)
            msg = err if bad == me else None
            text = f"{type(msg).__name__}: {msg}" if msg is not None else self._read(call, bad)
            cls_name, _, detail = text.partition(": ")
            cls = getattr(_errors, cls_name, None)
            cls = cls if isinstance(cls, type) and issubclass(cls, _errors.BbzoError) else WorkerError
            where = f"rank {bad} of {w}" + (f", step {step}" if step is not None else "")
            raise cls(f"{where}: {detail if cls is not WorkerError else text}") from (err if bad == me else None)
        self._forget(call)
        if _SKIP in statuses:
            union = torch.stack([g[o:o + batch] for g in gathered]).amax(0)
            raise SkipSamples(union.nonzero().flatten())
        losses = torch.empty(len(probes), dtype=torch.float64)
        for p, g in zip(parts, gathered):
            losses[p] = g[o + batch:o + batch + p.numel()]
        base = torch.tensor(float(gathered[0][1]), dtype=torch.float64) if need_base else None
        return base, losses

    # ------------------------------------------------------------------ collectives
    def _gather(self, vec: torch.Tensor, call: int, step: Optional[int]) -> list[torch.Tensor]:
        ctx = self.ctx
        dev = ctx.device
        out = [torch.empty_like(vec, device=dev) for _ in range(self.world)]
        try:
            dist.all_gather(out, vec.to(dev))
        except Exception as e:  # noqa: BLE001 -- a rank died, hangs, or the connection broke
            missing = [r for r in range(self.world) if not self._posted(call, r)]
            who = (f"rank {', '.join(map(str, missing))} did not finish" if missing
                   else "a rank dropped out of the process group during")
            at = f"step {step}" if step is not None else f"evaluation {call}"
            raise WorkerError(
                f"{who} {at} within --worker-timeout {ctx.timeout:g} s (it died, hangs or lost its connection; "
                f"{type(e).__name__}: {str(e).splitlines()[0][:200]}). Nothing of this step was applied; the last "
                "completed step is in the checkpoint: fix the cause (its log shows the error), then rerun the same "
                "command with --resume, with any number of workers.") from None
        return [t.cpu() for t in out]

    def _posted(self, call: int, r: int) -> bool:
        try:
            return bool(self.ctx.store.check([self._key("done", call, r)]))
        except Exception:  # noqa: BLE001 -- the store itself is gone with the failed node
            return False

    def _read(self, call: int, r: int) -> str:
        try:
            return self.ctx.store.get(self._key("error", call, r)).decode(errors="replace")
        except Exception:  # noqa: BLE001
            return "WorkerError: its error message could not be read from the rendezvous store"

    def _forget(self, call: int) -> None:
        try:
            self.ctx.store.delete_key(self._key("done", call, self.rank))
        except Exception:  # noqa: BLE001 -- housekeeping only
            pass

    def __repr__(self) -> str:
        return f"DistributedExecutor(rank={self.rank}, world={self.world})"


def as_executor(executor: Any) -> Executor:
    """An executor from ``None`` (serial), an int (serial in that many shards) or an executor."""
    if executor is None:
        return SerialExecutor()
    if isinstance(executor, Executor):
        return executor
    if isinstance(executor, int):
        return SerialExecutor(executor)
    raise ConfigError(f"executor must be an Executor or a number of shards, got {type(executor).__name__}.")


def default_executor() -> Executor:
    """Distributed when this process is a rank of a process group with more than one rank, else serial."""
    ctx = current()
    return DistributedExecutor(ctx) if ctx is not None and ctx.world > 1 else SerialExecutor()
