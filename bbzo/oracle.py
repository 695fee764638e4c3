"""Query-only black-box oracles.

An :class:`Oracle` is something bbzo may only *query*: a batch of inputs goes in, a batch of outputs
comes back, and nothing else is known about it (no gradient, no internals). The base class does the
bookkeeping every black box needs, so subclasses only implement :meth:`Oracle._query`:

* runs the query under ``torch.no_grad()`` and refuses inputs that require grad (a gradient must
  never flow through a black box);
* validates what comes back: a tensor with one row per input row, a floating dtype, the declared
  per-row shape, and no NaN/inf (:class:`~bbzo.errors.OracleError` names the oracle and the number of
  bad rows);
* counts queries (rows) and calls, and enforces an optional budget, raising
  :class:`~bbzo.errors.BudgetExceeded` *before* the call that would exceed it.
"""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .errors import BudgetExceeded, ConfigError, OracleError

__all__ = ["Oracle", "FunctionOracle", "ModuleOracle"]


class Oracle(ABC):
    """Abstract, batched, query-only black box.

    Args:
        name: Shown in every error message and log line.
        max_rows: Optional budget on the total number of input rows (queries).
        max_calls: Optional budget on the number of calls.
        input_shape: Optional per-row input shape (without the batch dimension) to check.
        output_shape: Optional per-row output shape to check.
    """

    def __init__(
        self,
        *,
        name: Optional[str] = None,
        max_rows: Optional[int] = None,
        max_calls: Optional[int] = None,
        input_shape: Optional[Sequence[int]] = None,
        output_shape: Optional[Sequence[int]] = None,
    ) -> None:
        self.name = name or type(self).__name__
        for label, value in (("max_rows", max_rows), ("max_calls", max_calls)):
            if value is not None and value < 0:
                raise ConfigError(f"{self.name}: {label} must be >= 0 or None, got {value}.")
        self.max_rows = max_rows
        self.max_calls = max_calls
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.output_shape = tuple(output_shape) if output_shape is not None else None
        self.rows_used = 0
        self.calls_used = 0

    # ------------------------------------------------------------------ to implement
    @abstractmethod
    def _query(self, inputs: torch.Tensor, *conditions: torch.Tensor) -> torch.Tensor:
        """Answer a batch. ``inputs``: ``(N, *input_shape)``; returns ``(N, *output_shape)``.

        ``conditions`` are optional per-row tensors ``(N, ...)`` (e.g. a Reynolds number per state)
        for oracles that take them; an oracle that takes none simply does not declare them.
        """

    # ------------------------------------------------------------------ public
    def query(self, inputs: torch.Tensor, *conditions: torch.Tensor) -> torch.Tensor:
        """Query the black box with a batch of ``N`` rows; returns ``N`` rows.

        ``conditions``: per-row side inputs ``(N, ...)`` passed on to the oracle (same checks: no
        grad, one row per input row).

        Raises:
            OracleError: inputs require grad or have the wrong shape; the answer is malformed or
                has non-finite rows.
            BudgetExceeded: this call would exceed ``max_rows`` or ``max_calls`` (nothing is run).
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
        self._check_budget(n)
        with torch.no_grad():
            out = self._query(inputs, *conditions)
        self.rows_used += n
        self.calls_used += 1
        return self._validate(out, n, inputs)

    __call__ = query

    def _takes_conditions(self, k: int) -> bool:
        return _max_conditions(type(self)) >= k

    def _check_budget(self, n: int) -> None:
        if self.max_rows is not None and self.rows_used + n > self.max_rows:
            raise BudgetExceeded(
                f"{self.name}: this call of {n} rows would use {self.rows_used + n} of a budget of "
                f"{self.max_rows} rows ({self.rows_used} used). Raise max_rows / --max-queries, or "
                "lower the query cost per step (fewer coordinates, higher sparsity, smaller batch)."
            )
        if self.max_calls is not None and self.calls_used + 1 > self.max_calls:
            raise BudgetExceeded(
                f"{self.name}: call budget of {self.max_calls} calls is spent. Raise max_calls."
            )

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
        if not bool(finite.all()):
            bad = int((~finite).sum())
            first = int((~finite).nonzero()[0])
            raise OracleError(
                f"{self.name} returned NaN/inf in {bad} of {n} rows (first bad row {first}). The black "
                "box diverged or failed on those inputs: check them (is a perturbation step mu too "
                "large? are the inputs in the simulator's valid range?)."
            )
        return out.detach()

    # ------------------------------------------------------------------ counters / checkpoint
    def reset_counters(self) -> None:
        self.rows_used = 0
        self.calls_used = 0

    def state_dict(self) -> dict[str, int]:
        return {"rows_used": self.rows_used, "calls_used": self.calls_used}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.rows_used = int(state["rows_used"])
        self.calls_used = int(state["calls_used"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, rows_used={self.rows_used}, calls_used={self.calls_used})"


@functools.lru_cache(maxsize=None)
def _max_conditions(cls: type) -> float:
    """How many per-row conditions ``cls._query`` accepts after ``inputs`` (inf for ``*args``)."""
    params = list(inspect.signature(cls._query).parameters.values())[2:]  # self, inputs
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return float("inf")
    return len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])


class FunctionOracle(Oracle):
    """Wrap a plain batched function ``fn(inputs) -> outputs`` (torch or numpy) as an :class:`Oracle`.

    Args:
        fn: Batched callable. Receives a torch tensor, or a numpy array if ``numpy=True``.
        numpy: Hand ``fn`` a numpy array (on CPU) and turn its answer back into a tensor on the
            inputs' device and dtype. A numpy function cannot leak a gradient.
    """

    def __init__(self, fn: Callable[[Any], Any], *, numpy: bool = False, **kw: Any) -> None:
        kw.setdefault("name", getattr(fn, "__name__", "FunctionOracle"))
        super().__init__(**kw)
        self.fn = fn
        self.numpy = numpy

    def _query(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.numpy:
            out = self.fn(inputs.detach().cpu().numpy())
            out = torch.as_tensor(np.asarray(out))
            if out.is_floating_point():
                out = out.to(device=inputs.device, dtype=inputs.dtype)
            return out
        return self.fn(inputs)


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
