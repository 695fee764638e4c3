"""Query-only black-box oracles.

An :class:`Oracle` is something bbzo may only *query*: a batch of inputs goes in, a batch of outputs
comes back, and nothing else is known about it (no gradient, no internals). The base class does the
bookkeeping every black box needs, so subclasses only implement :meth:`Oracle._query`:

* runs the query under ``torch.no_grad()`` and refuses inputs that require grad (a gradient must
  never flow through a black box);
* splits calls larger than ``max_batch`` rows into several (a ``K x B`` batch of 224 px images must not
  exhaust memory) and reassembles the answers in order;
* validates what comes back: a tensor with one row per input row, a floating dtype, the declared
  per-row shape, and no NaN/inf (:class:`~bbzo.errors.OracleError` names the oracle and the bad rows);
* turns any exception of the black box's own code into one :class:`~bbzo.errors.OracleError` that
  names the oracle, the call (``call #50 (step 25, 1088 rows)``) and where it was raised;
* has its rows and calls counted by a :class:`~bbzo.ledger.QueryLedger` (a private one, until a run
  attaches its own), which enforces the budgets *before* the call that would exceed them;
* ``close()`` (and ``with oracle: ...``) releases what it holds, e.g. an external program;
* hands a **common-random-numbers seed** to black boxes that take one: inside
  ``with common_random_numbers(seed):`` every query passes ``seed=`` to a ``_query`` (or a
  :class:`FunctionOracle`'s function) that has a ``seed`` parameter. A stochastic simulator that draws its
  random numbers from that seed, the same way for every row, answers the base and every perturbed
  parameter set of a training step from one random stream, so a finite difference measures the change
  of the parameters and not the change of the noise. The trainer derives the seed of step ``t`` from
  the run's seed (:func:`step_seed`): different steps use different streams, and a resumed run the same.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import traceback
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .errors import BbzoError, ConfigError, OracleError
from .ledger import QueryLedger

__all__ = ["Oracle", "FunctionOracle", "ModuleOracle", "where_raised", "answering_failures_with_nan",
           "common_random_numbers", "current_seed", "step_seed", "SEED_LIMIT"]

#: Seeds handed to oracles are integers in ``[0, SEED_LIMIT)``: they fit a C ``int``, awk's ``srand`` and
#: numpy's generators alike (the external protocol sends them as decimal text).
SEED_LIMIT = 2 ** 31
_SEED: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("bbzo_crn_seed", default=None)


def _valid_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < SEED_LIMIT:
        raise ConfigError(f"a common-random-numbers seed must be an integer in [0, 2**31), got {seed!r}; derive one "
                          "per step with bbzo.oracle.step_seed(run_seed, step), or take seed % 2**31.")
    return int(seed)


@contextlib.contextmanager
def common_random_numbers(seed: Optional[int]) -> Iterator[Optional[int]]:
    """Every oracle query in this block (this thread or task) is handed ``seed=seed``, if it takes one.

    ``seed=None`` changes nothing, so a caller can write ``with common_random_numbers(seed if crn else None):``.
    Blocks nest; the inner seed wins. The seed follows ``contextvars``: a thread started inside the block does not
    see it unless it runs in a copy of the context (``contextvars.copy_context().run``), as
    :class:`~bbzo.oracles.process.ProcessPool` does.
    """
    token = _SEED.set(_SEED.get() if seed is None else _valid_seed(seed))
    try:
        yield _SEED.get()
    finally:
        _SEED.reset(token)


def current_seed() -> Optional[int]:
    """The seed of the innermost :func:`common_random_numbers` block, or None outside one."""
    return _SEED.get()


def step_seed(seed: int, step: int) -> int:
    """The common-random-numbers seed of training step ``step`` of a run seeded ``seed``, in ``[0, 2**31)``.

    A hash (numpy's ``SeedSequence``) of ``(seed, step)``: every evaluation of one step shares it, neighbouring
    steps get unrelated streams, and it is a pure function of the pair, so a resumed run hands the oracle the
    same seeds as an uninterrupted one.
    """
    return int(np.random.SeedSequence([int(seed), int(step), 0xC2A]).generate_state(1, np.uint32)[0]) % SEED_LIMIT

_FAILURES_AS_NAN: contextvars.ContextVar[bool] = contextvars.ContextVar("bbzo_failures_as_nan", default=False)


@contextlib.contextmanager
def answering_failures_with_nan(enabled: bool = True) -> Iterator[None]:
    """Inside, every oracle answers the rows it cannot produce with NaN instead of raising.

    The training step enters it when the run's failure policy is ``penalize`` or ``skip``
    (:mod:`bbzo.failures` then resolves the NaN rows); outside, a failed row is an :class:`OracleError`.
    """
    token = _FAILURES_AS_NAN.set(bool(enabled) or _FAILURES_AS_NAN.get())
    try:
        yield
    finally:
        _FAILURES_AS_NAN.reset(token)


def where_raised(e: BaseException) -> str:
    """`` at file.py:12`` for the innermost frame of ``e``'s traceback (empty if there is none)."""
    tb = traceback.extract_tb(e.__traceback__)
    return f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""


class Oracle(ABC):
    """Abstract, batched, query-only black box.

    Args:
        name: Shown in every error message and log line; keys the oracle's account in a ledger.
        max_rows: Optional budget on the total number of input rows this oracle answers.
        max_calls: Optional budget on the number of calls.
        input_shape: Optional per-row input shape (without the batch dimension) to check.
        output_shape: Optional per-row output shape to check.
        max_batch: Split calls of more rows than this into several calls of ``_query`` (``None``: never).
    """

    def __init__(
        self,
        *,
        name: Optional[str] = None,
        max_rows: Optional[int] = None,
        max_calls: Optional[int] = None,
        input_shape: Optional[Sequence[int]] = None,
        output_shape: Optional[Sequence[int]] = None,
        max_batch: Optional[int] = None,
    ) -> None:
        self.name = name or type(self).__name__
        for label, value in (("max_rows", max_rows), ("max_calls", max_calls)):
            if value is not None and value < 0:
                raise ConfigError(f"{self.name}: {label} must be >= 0 or None, got {value}.")
        if max_batch is not None and max_batch < 1:
            raise ConfigError(f"{self.name}: max_batch must be >= 1 or None, got {max_batch}.")
        self.max_rows = max_rows
        self.max_calls = max_calls
        self.max_batch = max_batch
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.output_shape = tuple(output_shape) if output_shape is not None else None
        self.ledger: QueryLedger = QueryLedger()
        self.ledger.attach(self)
        #: always answer rows it cannot produce with NaN instead of raising (see also answering_failures_with_nan)
        self.allow_nonfinite = False

    # ------------------------------------------------------------------ to implement
    @abstractmethod
    def _query(self, inputs: torch.Tensor, *conditions: torch.Tensor) -> torch.Tensor:
        """Answer a batch. ``inputs``: ``(N, *input_shape)``; returns ``(N, *output_shape)``.

        ``conditions`` are optional per-row tensors ``(N, ...)`` (e.g. a Reynolds number per state)
        for oracles that take them; an oracle that takes none simply does not declare them.
        ``N <= max_batch`` when ``max_batch`` is set.
        """

    def close(self) -> None:
        """Release what the oracle holds (a process, a connection). The base holds nothing."""

    def __enter__(self) -> "Oracle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ public
    def query(self, inputs: torch.Tensor, *conditions: torch.Tensor) -> torch.Tensor:
        """Query the black box with a batch of ``N`` rows; returns ``N`` rows.

        ``conditions``: per-row side inputs ``(N, ...)`` passed on to the oracle (same checks: no
        grad, one row per input row).

        Raises:
            OracleError: inputs require grad or have the wrong shape; the answer is malformed or
                has non-finite rows; the black box raised.
            BudgetExceeded: this call would exceed a budget of the oracle or its ledger (nothing is run).
        """
        if not isinstance(inputs, torch.Tensor):
            raise OracleError(f"{self.name}: query() takes a torch.Tensor, got {type(inputs).__name__}.")
        if inputs.requires_grad:
            raise OracleError(
                f"{self.name} is a query-only black box and refuses inputs that require grad. "
                "Call it under torch.no_grad() or pass inputs.detach(); to train through it use a "
                "zeroth-order estimator (bbzo.create_estimator)."
            )
        if inputs.dim() == 0:
            raise OracleError(f"{self.name}: inputs need a batch dimension, got a scalar tensor.")
        if self.input_shape is not None and tuple(inputs.shape[1:]) != self.input_shape:
            raise OracleError(
                f"{self.name}: each input row must have shape {self.input_shape}, got a batch of "
                f"shape {tuple(inputs.shape)}. Reshape the inputs to (N, {', '.join(map(str, self.input_shape))})."
            )
        n = int(inputs.shape[0])
        for i, c in enumerate(conditions):
            if not isinstance(c, torch.Tensor) or c.dim() == 0 or c.shape[0] != n:
                shape = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
                raise OracleError(f"{self.name}: condition {i} must be a tensor with one row per input row "
                                  f"({n}), got {shape}.")
            if c.requires_grad:
                raise OracleError(f"{self.name} is a query-only black box: condition {i} requires grad. "
                                  "Pass it detached.")
        if conditions and not self._takes_conditions(len(conditions)):
            raise OracleError(f"{self.name} takes no per-row conditions, got {len(conditions)}; call query(inputs).")
        self.ledger.check_call(self, n)
        call = self.call_label(n)
        seed = current_seed()
        extra = {"seed": seed} if seed is not None and self.accepts_seed else {}
        with torch.no_grad():
            try:
                out = self._query_in_batches(inputs, conditions, extra)
            except BbzoError:
                raise
            except Exception as e:  # the black box's own code failed: one clear line, the cause chained
                raise OracleError(f"oracle {self.name}, {call} raised {type(e).__name__}{where_raised(e)}: {e}") from e
        self.ledger.record_call(self, n)
        return self._validate(out, n, inputs)

    __call__ = query

    def call_label(self, n: int) -> str:
        """``call #50 (step 25, 1088 rows)``: how errors name the call about to be made."""
        acc = self.ledger.account(self)
        step = self.ledger.step
        where = f"step {step}, " if step is not None and not self.ledger.in_evaluation else (
            "evaluation, " if self.ledger.in_evaluation else "")
        return f"call #{acc.calls + acc.eval_calls + 1} ({where}{n} rows)"

    def _query_in_batches(self, inputs: torch.Tensor, conditions: Sequence[torch.Tensor],
                          extra: Optional[dict[str, Any]] = None) -> Any:
        n, extra = int(inputs.shape[0]), extra or {}
        if self.max_batch is None or n <= self.max_batch:
            return self._query(inputs, *conditions, **extra)
        parts = []
        for s in range(0, n, self.max_batch):  # one seed for every part: a row's answer must not depend on the split
            part = self._query(inputs[s:s + self.max_batch], *(c[s:s + self.max_batch] for c in conditions), **extra)
            parts.append(self._validate(part, min(self.max_batch, n - s), inputs))
        return torch.cat(parts)

    def _takes_conditions(self, k: int) -> bool:
        return _max_conditions(type(self)) >= k

    @property
    def accepts_seed(self) -> bool:
        """Whether this black box takes a common-random-numbers seed (its ``_query`` has a ``seed`` parameter)."""
        return _takes_seed(type(self)._query)

    def _validate(self, out: Any, n: int, inputs: torch.Tensor) -> torch.Tensor:
        if isinstance(out, np.ndarray):
            out = torch.from_numpy(out).to(inputs.device)
        if not isinstance(out, torch.Tensor):
            raise OracleError(f"{self.name} returned {type(out).__name__}; it must return a tensor or ndarray.")
        if out.dim() == 0 or out.shape[0] != n:
            raise OracleError(
                f"{self.name} returned shape {tuple(out.shape)} for {n} input rows; an oracle must "
                f"return one row per input row, i.e. shape ({n}, ...)."
            )
        if not out.is_floating_point():
            raise OracleError(f"{self.name} returned dtype {out.dtype}; a floating dtype is required.")
        if self.output_shape is not None and tuple(out.shape[1:]) != self.output_shape:
            raise OracleError(
                f"{self.name} returned rows of shape {tuple(out.shape[1:])}, declared output_shape "
                f"is {self.output_shape}."
            )
        finite = torch.isfinite(out.reshape(n, -1)).all(dim=1)
        if not bool(finite.all()) and self.answers_failures_with_nan:
            return out.detach()
        if not bool(finite.all()):
            bad = int((~finite).sum())
            first = int((~finite).nonzero()[0])
            raise OracleError(
                f"{self.name} returned NaN/inf in {bad} of {n} rows (first bad row {first}). The black "
                "box diverged or failed on those inputs: check them (is a perturbation step mu too "
                "large? are the inputs in the simulator's valid range?)."
            )
        return out.detach()

    @property
    def answers_failures_with_nan(self) -> bool:
        """Whether a failed row comes back as NaN (``allow_nonfinite``, or inside :func:`answering_failures_with_nan`)."""
        return self.allow_nonfinite or _FAILURES_AS_NAN.get()

    # ------------------------------------------------------------------ counters (kept by the ledger)
    @property
    def rows_used(self) -> int:
        """Charged rows answered so far (evaluation rows are counted apart by the ledger)."""
        return self.ledger.account(self).rows

    @property
    def calls_used(self) -> int:
        return self.ledger.account(self).calls

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, rows_used={self.rows_used}, calls_used={self.calls_used})"


@functools.lru_cache(maxsize=None)
def _max_conditions(cls: type) -> float:
    """How many per-row conditions ``cls._query`` accepts after ``inputs`` (inf for ``*args``; ``seed`` is not one)."""
    params = [p for p in list(inspect.signature(cls._query).parameters.values())[2:] if p.name != "seed"]  # self, inputs
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return float("inf")
    return len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])


def _takes_seed(fn: Any) -> bool:
    """Whether ``fn`` has a parameter named ``seed`` that can be passed by keyword."""
    try:
        p = inspect.signature(fn).parameters.get("seed")
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


class FunctionOracle(Oracle):
    """Wrap a plain batched function ``fn(inputs) -> outputs`` (torch or numpy) as an :class:`Oracle`.

    Args:
        fn: Batched callable. Receives a torch tensor, or a numpy array if ``numpy=True``. If it has a
            ``seed`` parameter, it is called ``fn(inputs, seed=s)`` inside a :func:`common_random_numbers`
            block (and ``fn(inputs)`` outside one).
        numpy: Hand ``fn`` a numpy array (on CPU) and turn its answer back into a tensor on the
            inputs' device and dtype. A numpy function cannot leak a gradient.
    """

    def __init__(self, fn: Callable[[Any], Any], *, numpy: bool = False, **kw: Any) -> None:
        kw.setdefault("name", getattr(fn, "__name__", "FunctionOracle"))
        super().__init__(**kw)
        self.fn = fn
        self.numpy = numpy

    @property
    def accepts_seed(self) -> bool:
        return _takes_seed(self.fn)

    def _query(self, inputs: torch.Tensor, seed: Optional[int] = None) -> torch.Tensor:
        kw = {"seed": seed} if seed is not None else {}
        if self.numpy:
            out = self.fn(inputs.detach().cpu().numpy(), **kw)
            out = torch.as_tensor(np.asarray(out))
            if out.is_floating_point():
                out = out.to(device=inputs.device, dtype=inputs.dtype)
            return out
        return self.fn(inputs, **kw)


class ModuleOracle(Oracle):
    """A fixed ``nn.Module`` used as a black box (e.g. a plain CIFAR classifier behind an API).

    The module is put in eval mode and frozen; only its outputs are ever seen.
    """

    def __init__(self, module: nn.Module, **kw: Any) -> None:
        kw.setdefault("name", type(module).__name__)
        super().__init__(**kw)
        self.module = module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def _query(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.module(inputs)
