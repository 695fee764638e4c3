"""Executors: who evaluates the probes of a step.

An estimator asks (a :class:`~bbzo.messages.Request`) and is told; an *executor* stands between, wrapping the
minibatch's evaluator (:mod:`bbzo.adapters`) and returning one :class:`~bbzo.messages.Evaluation` value:

* :class:`SerialExecutor` -- this process evaluates everything (optionally in ``n_shards`` shards dealt as a
  distributed run would deal them, the same numbers): the default.
* :class:`DistributedExecutor` -- the probes are split across the ranks of a ``torch.distributed``
  process group. Every rank knows every probe (``ask`` is deterministic), evaluates its own shard, and
  **one** ``all_gather`` (:mod:`.codec`) brings every rank the losses of all shards, the base losses and any
  white-box gradient (evaluated once, by rank 0), what each rank spent (queries, oracle rows and calls) and
  its status. There is no master: every rank then runs the same ``tell`` and the same optimizer step.

**Shards are whole batched calls, balanced by cost without a cost table.** The evaluator says which batched
calls (chunks) a serial evaluation makes (:meth:`bbzo.adapters.Evaluator.chunks`); ranks get whole chunks
(:func:`deal`), so every call holds the probes it holds in a serial run and a distributed step equals the serial
one **bitwise** (with the same threads per process). With feature reuse a coordinate's cost depends on its start
stage (an early-layer coordinate re-runs most of the network, a late one almost nothing), so the chunks of each
stage are dealt in turn: every shard costs ``1/M`` of the step, up to one chunk per stage.

**Faults.** A rank whose evaluation raises reports the error in the gather, and every rank raises it
(same type, naming the rank and step). A rank that died or hangs makes the gather fail within the
process group's timeout (``--worker-timeout``); each rank posts a heartbeat in the rendezvous store
before the gather, so the others name the missing rank(s) in a :class:`~bbzo.errors.WorkerError`.
"""

from __future__ import annotations

import signal
import time
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from .. import errors as _errors
from ..errors import ConfigError, WorkerError
from ..ledger import Account, Spent
from ..probes import OutputProbes, Probes
from ..messages import Evaluation, Request
from . import codec
from ..signals import Interrupted, deferred
from .context import DistContext, current

__all__ = ["Executor", "SerialExecutor", "DistributedExecutor", "deal", "as_executor", "default_executor"]


class Executor:
    """Evaluates a step's :class:`~bbzo.messages.Request` on a minibatch's evaluator: one :class:`~bbzo.messages.Evaluation`."""

    world: int = 1
    rank: int = 0

    def evaluate(self, evaluator: Any, request: Request) -> Evaluation:
        raise NotImplementedError


def _direct(evaluator: Any, request: Request) -> tuple[Optional[dict], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(grads, base (B,), direct_loss (B,))``: the white-box gradient and the base losses a request asks for."""
    grads = base = direct = None
    if request.gradient is not None:
        grads, per = evaluator.gradient(request.gradient, request.context)
        if request.gradient == "surrogate":
            base = per  # the surrogate's forward pass is the unperturbed loss: it is the base query
        else:
            direct = per
    if request.base and base is None:
        base = evaluator.base_losses()
    return grads, base, direct


class SerialExecutor(Executor):
    """Everything in this process; ``n_shards`` > 1 evaluates the probes in the shards a distributed run of
    that many ranks would deal (:func:`deal`), one after the other (the same numbers, bitwise)."""

    def __init__(self, n_shards: int = 1) -> None:
        if n_shards < 1:
            raise ConfigError(f"n_shards must be >= 1, got {n_shards}.")
        self.n_shards = int(n_shards)

    def evaluate(self, evaluator: Any, request: Request) -> Evaluation:
        start, calls0 = evaluator.ledger.state_dict(), evaluator.calls
        t0 = time.perf_counter()
        grads, base, direct = _direct(evaluator, request)
        probes, m = request.probes, request.num_probes
        if m == 0:
            per = torch.zeros(0, evaluator.batch, dtype=torch.float64)
        elif self.n_shards == 1:
            per = evaluator.probe_losses(probes)
        else:
            per = torch.empty(m, evaluator.batch, dtype=torch.float64)
            for rows in deal(evaluator.chunks(probes), self.n_shards):
                if len(rows):
                    per[rows] = evaluator.probe_losses(probes.select(rows))
        return Evaluation(losses=per.mean(1), per_sample=per if request.per_sample else None, base=base, grads=grads,
                          direct_loss=direct, pullback=evaluator.pullback if isinstance(probes, OutputProbes) else None,
                          spent=evaluator.ledger.spent_since(start), calls=evaluator.calls - calls0,
                          busy=[time.perf_counter() - t0], sizes=[m])

    def __repr__(self) -> str:
        return f"SerialExecutor(n_shards={self.n_shards})"


def deal(chunks: Sequence[tuple[int, torch.Tensor]], world: int) -> list[torch.Tensor]:
    """The probe rows ``(M_r,)`` (sorted, int64) each of ``world`` ranks evaluates: whole chunks, dealt round-robin.

    ``chunks``: ``[(cost class, rows), ...]`` from :meth:`bbzo.adapters.Evaluator.chunks`. Every chunk goes to one
    rank whole, so it is evaluated as in a serial run (bitwise the same numbers). Chunks of one cost class (one
    start stage, whose probes cost the same with feature reuse) are dealt in turn, the turn carrying over from
    class to class and starting at rank 1 (rank 0 also evaluates the base): every rank gets a ``1/world`` share of
    every class, up to one chunk.
    """
    if world < 1:
        raise ConfigError(f"world size must be >= 1, got {world}.")
    parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    turn = 1 % world
    by_class: dict[int, list[torch.Tensor]] = {}
    for cls, rows in chunks:
        by_class.setdefault(int(cls), []).append(rows)
    for cls in by_class:
        for rows in by_class[cls]:
            parts[turn].append(rows)
            turn = (turn + 1) % world
    return [torch.sort(torch.cat(p).to(torch.int64)).values if p else torch.zeros(0, dtype=torch.int64) for p in parts]


_OK, _ERROR = 0.0, 1.0
_ACCOUNT_FIELDS = ("rows", "calls", "eval_rows", "eval_calls")


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

    @staticmethod
    def _layout(rank: int, request: Request, rows: int, batch: int, accounts: list[str], grad_numel: int
                ) -> codec.Layout:
        """What rank ``rank`` sends: status, busy seconds, objective calls, what it spent, rank 0's base losses
        and white-box gradient, and its probes' losses (per sample when the request needs them)."""
        first = rank == 0
        return [("status", 1), ("busy", 1), ("calls", 1), ("queries", 2), ("accounts", 4 * len(accounts)),
                ("base", batch if first and request.has_base else 0),
                ("direct", batch if first and request.gradient == "objective" else 0),
                ("grads", grad_numel if first and request.gradient is not None else 0),
                ("losses", rows * (batch if request.per_sample else 1))]

    def evaluate(self, evaluator: Any, request: Request) -> Evaluation:
        ctx, w, me = self.ctx, self.world, self.rank
        call = self.calls
        self.calls += 1
        probes, m, batch = request.probes, request.num_probes, int(evaluator.batch)
        parts = deal(evaluator.chunks(probes), w) if m else [torch.zeros(0, dtype=torch.int64) for _ in range(w)]
        mine = parts[me]
        ledger = evaluator.ledger
        step = ledger.step
        accounts = sorted(ledger.accounts)
        shapes = {n: p.shape for n, p in evaluator.params.items()}
        grad_numel = sum(int(s.numel()) for s in shapes.values())
        start, calls0 = ledger.state_dict(), evaluator.calls
        status, err = _OK, None
        grads = base = direct = None
        local = torch.zeros(0, batch, dtype=torch.float64)
        t0 = time.perf_counter()
        try:
            if me == 0:
                grads, base, direct = _direct(evaluator, request)
            if len(mine):
                local = evaluator.probe_losses(probes.select(mine)).to(torch.float64).cpu()
        except Exception as e:  # noqa: BLE001 -- reported to every rank, re-raised below
            status, err = _ERROR, e
        except Interrupted as e:  # meet the others first: a rank the launcher stopped because a peer died names
            status, err = _ERROR, e  # that peer (the collective below fails), not the launcher's SIGTERM
        busy = time.perf_counter() - t0
        spent = ledger.spent_since(start)
        layouts = [self._layout(r, request, int(parts[r].numel()), batch, accounts, grad_numel) for r in range(w)]
        length = max(codec.size(lay) for lay in layouts)
        values: dict[str, Any] = {"status": status, "busy": busy, "calls": evaluator.calls - calls0,
                                  "queries": [spent.queries, spent.eval_queries],
                                  "accounts": [float(getattr(spent.accounts.get(n, Account()), f))
                                               for n in accounts for f in _ACCOUNT_FIELDS]}
        if status == _OK:
            values["losses"] = local if request.per_sample else local.mean(1)
            if base is not None:
                values["base"] = base
            if direct is not None:
                values["direct"] = direct
            if grads is not None:
                values["grads"] = torch.cat([grads[n].detach().double().cpu().reshape(-1) for n in shapes])
        message = codec.pack(layouts[me], values, length)
        with deferred():  # a signal now would leave the other ranks waiting in the collective
            if err is not None:
                ctx.store.set(self._key("error", call, me), f"{type(err).__name__}: {err}"[:4000])
            ctx.store.set(self._key("done", call, me), "1")
            gathered = [codec.unpack(lay, g) for lay, g in zip(layouts, self._gather(message, call, step))]
        self.last_busy = [float(g["busy"]) for g in gathered]
        self.last_sizes = [int(p.numel()) for p in parts]
        statuses = [float(g["status"]) for g in gathered]
        if _ERROR in statuses:
            if isinstance(err, Interrupted):  # every rank met: it was a signal, not a dead peer
                raise err
            bad = statuses.index(_ERROR)
            msg = err if bad == me else None
            text = f"{type(msg).__name__}: {msg}" if msg is not None else self._read(call, bad)
            cls_name, _, detail = text.partition(": ")
            if cls_name == "Interrupted":  # another rank was stopped by a signal (the launcher sends it to all)
                raise Interrupted(signal.SIGINT if "SIGINT" in detail else signal.SIGTERM)
            cls = getattr(_errors, cls_name, None)
            cls = cls if isinstance(cls, type) and issubclass(cls, _errors.BbzoError) else WorkerError
            where = f"rank {bad} of {w}" + (f", step {step}" if step is not None else "")
            raise cls(f"{where}: {detail if cls is not WorkerError else text}") from (err if bad == me else None)
        self._forget(call)
        total = Spent()
        for g in gathered:
            acc = g["accounts"].view(-1, 4) if accounts else torch.zeros(0, 4)
            total = total + Spent(int(g["queries"][0]), int(g["queries"][1]),
                                  {n: Account(*(int(v) for v in row.tolist())) for n, row in zip(accounts, acc)})
        per = torch.empty(m, batch, dtype=torch.float64) if request.per_sample else torch.empty(m, dtype=torch.float64)
        for p, g in zip(parts, gathered):
            if p.numel():
                per[p] = g["losses"].view(-1, batch) if request.per_sample else g["losses"]
        first = gathered[0]
        if request.gradient is not None:
            flat = first["grads"]
            grads, o = {}, 0
            for n, shp in shapes.items():
                k = int(shp.numel())
                ref = evaluator.params[n]
                grads[n] = flat[o:o + k].view(shp).to(device=ref.device, dtype=ref.dtype)
                o += k
        return Evaluation(
            losses=per.mean(1) if request.per_sample else per, per_sample=per if request.per_sample else None,
            base=first["base"].clone() if request.has_base else None,
            grads=grads, direct_loss=first["direct"].clone() if request.gradient == "objective" else None,
            pullback=evaluator.pullback if isinstance(probes, OutputProbes) else None, spent=total,
            calls=sum(int(g["calls"]) for g in gathered), busy=self.last_busy, sizes=self.last_sizes)

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
