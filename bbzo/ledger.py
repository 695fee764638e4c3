"""The query ledger: who counts the queries (one place for a whole run).

Two units are counted:

* **queries** -- parameter-set evaluations of the loss on the minibatch (what an estimator asks for:
  CGE costs ``d + 1`` per step). Evaluators charge them *before* each batched loss call.
* **rows** and **calls** -- what each black box actually received, per oracle (a run may hold
  several: a denoiser feeding a classifier). :class:`~bbzo.oracle.Oracle` charges them before it runs.

Budgets exist in both units -- ``max_queries`` and ``max_rows`` for the whole ledger, ``max_rows`` /
``max_calls`` per oracle -- and are checked *before* the call that would exceed them, so a
:class:`~bbzo.errors.BudgetExceeded` never loses an answer that was paid for. Inside
``with ledger.evaluation():`` everything is counted apart (``eval_queries``, ``eval_rows``) and no budget
applies: measuring a model is not training it. ``state_dict`` / ``load_state_dict`` restore the counts
exactly on resume.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, astuple, dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Optional

from .errors import BudgetExceeded, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .oracle import Oracle

__all__ = ["QueryLedger", "Account", "Spent"]


@dataclass
class Account:
    """What one oracle received: charged (training) rows/calls and uncharged evaluation rows/calls."""

    rows: int = 0
    calls: int = 0
    eval_rows: int = 0
    eval_calls: int = 0


@dataclass
class Spent:
    """What some work spent: queries (charged and evaluation) and, per oracle, an :class:`Account` of rows/calls.

    A value: the executor of a distributed run sums the ranks' ``Spent`` and the step settles the ledger once
    (:meth:`QueryLedger.settle`).
    """

    queries: int = 0
    eval_queries: int = 0
    accounts: dict[str, Account] = field(default_factory=dict)

    def __add__(self, other: "Spent") -> "Spent":
        names = sorted(set(self.accounts) | set(other.accounts))
        zero = Account()
        acc = {n: Account(*(a + b for a, b in zip(astuple(self.accounts.get(n, zero)), astuple(other.accounts.get(n, zero)))))
               for n in names}
        return Spent(self.queries + other.queries, self.eval_queries + other.eval_queries, acc)

    def rows(self) -> int:
        return sum(a.rows for a in self.accounts.values())

    def calls(self) -> int:
        return sum(a.calls for a in self.accounts.values())


class QueryLedger:
    """Counts queries (parameter-set evaluations) and, per oracle, rows and calls; enforces budgets.

    Args:
        max_queries: Budget on charged queries (``None``: unlimited).
        max_rows: Budget on charged rows summed over every oracle of the ledger.

    Attributes:
        queries, eval_queries: Charged / evaluation queries so far.
        step: The training step in progress (set by the trainer; quoted in oracle errors).
    """

    def __init__(self, max_queries: Optional[int] = None, max_rows: Optional[int] = None) -> None:
        for label, value in (("max_queries", max_queries), ("max_rows", max_rows)):
            if value is not None and value < 0:
                raise ConfigError(f"{label} must be >= 0 or None, got {value}.")
        self.max_queries = max_queries
        self.max_rows = max_rows
        self.queries = 0
        self.eval_queries = 0
        self.accounts: dict[str, Account] = {}
        self._oracles: dict[str, "Oracle"] = {}
        self.step: Optional[int] = None
        self._eval_depth = 0

    # ------------------------------------------------------------------ oracles
    def attach(self, oracle: "Oracle") -> "Oracle":
        """Count ``oracle`` here from now on (its account starts at zero); returns the oracle.

        Names must be unique within a ledger: they key the accounts in checkpoints and results.
        """
        name = oracle.name
        if name in self.accounts and getattr(oracle, "ledger", None) is not self:
            raise ConfigError(f"the ledger already counts an oracle named {name!r}; give each oracle of a "
                              "run its own name (Oracle(name=...)).")
        self.accounts.setdefault(name, Account())
        self._oracles[name] = oracle
        oracle.ledger = self
        return oracle

    def oracles(self) -> list["Oracle"]:
        """The oracles attached to this ledger."""
        return list(self._oracles.values())

    def account(self, oracle: Any) -> Account:
        name = oracle if isinstance(oracle, str) else oracle.name
        if name not in self.accounts:
            self.accounts[name] = Account()
        return self.accounts[name]

    # ------------------------------------------------------------------ scopes
    @property
    def in_evaluation(self) -> bool:
        return self._eval_depth > 0

    @contextlib.contextmanager
    def evaluation(self) -> Iterator["QueryLedger"]:
        """Queries and rows inside are counted apart and charged to no budget."""
        self._eval_depth += 1
        try:
            yield self
        finally:
            self._eval_depth -= 1

    # ------------------------------------------------------------------ charging
    def charge_queries(self, k: int) -> None:
        """Count ``k`` parameter-set evaluations about to be made (checked against ``max_queries`` first)."""
        if self.in_evaluation:
            self.eval_queries += k
            return
        if self.max_queries is not None and self.queries + k > self.max_queries:
            raise BudgetExceeded(
                f"this call of {k} queries would use {self.queries + k} of a budget of {self.max_queries} "
                f"queries ({self.queries} used). Raise max_queries / --max-queries, or lower the query cost "
                "per step (fewer coordinates, higher sparsity)."
            )
        self.queries += k

    def check_call(self, oracle: "Oracle", n: int) -> None:
        """Raise :class:`BudgetExceeded` if a call of ``n`` rows to ``oracle`` would exceed a budget."""
        if self.in_evaluation:
            return
        acc = self.account(oracle)
        if oracle.max_rows is not None and acc.rows + n > oracle.max_rows:
            raise BudgetExceeded(
                f"{oracle.name}: this call of {n} rows would use {acc.rows + n} of a budget of {oracle.max_rows} "
                f"rows ({acc.rows} used). Raise max_rows / --max-queries, or lower the query cost per step "
                "(fewer coordinates, higher sparsity, smaller batch)."
            )
        if oracle.max_calls is not None and acc.calls + 1 > oracle.max_calls:
            raise BudgetExceeded(f"{oracle.name}: call budget of {oracle.max_calls} calls is spent. Raise max_calls.")
        if self.max_rows is not None and self.rows() + n > self.max_rows:
            raise BudgetExceeded(
                f"this call of {n} rows to {oracle.name} would use {self.rows() + n} of the run's budget of "
                f"{self.max_rows} oracle rows ({self.rows()} used). Raise max_rows."
            )

    def record_call(self, oracle: "Oracle", n: int) -> None:
        """Count a call of ``n`` rows that ``oracle`` answered."""
        acc = self.account(oracle)
        if self.in_evaluation:
            acc.eval_rows += n
            acc.eval_calls += 1
        else:
            acc.rows += n
            acc.calls += 1

    # ------------------------------------------------------------------ reading
    def rows(self, oracle: Any = None) -> int:
        """Charged rows of one oracle (by object or name), or of all of them."""
        if oracle is not None:
            return self.account(oracle).rows
        return sum(a.rows for a in self.accounts.values())

    def calls(self, oracle: Any = None) -> int:
        if oracle is not None:
            return self.account(oracle).calls
        return sum(a.calls for a in self.accounts.values())

    def queries_left(self) -> Optional[int]:
        return None if self.max_queries is None else self.max_queries - self.queries

    def summary(self) -> dict[str, Any]:
        """Plain numbers for results files: queries, and rows/calls per oracle."""
        return {"queries": self.queries, "eval_queries": self.eval_queries, "max_queries": self.max_queries,
                "oracles": {n: asdict(a) for n, a in self.accounts.items()}}

    # ------------------------------------------------------------------ settling
    def spent_since(self, start: dict[str, Any]) -> Spent:
        """What was counted since ``start`` (a :meth:`state_dict`), as a :class:`Spent` value."""
        s0 = start.get("accounts", {})
        zero = asdict(Account())
        acc = {n: Account(**{k: v - s0.get(n, zero)[k] for k, v in asdict(a).items()}) for n, a in self.accounts.items()}
        return Spent(self.queries - int(start["queries"]), self.eval_queries - int(start.get("eval_queries", 0)),
                     {n: a for n, a in acc.items() if any(astuple(a))})

    def settle(self, start: dict[str, Any], spent: Spent) -> None:
        """Set the counts to ``start`` (a :meth:`state_dict`) plus ``spent``: the one place where a step's
        spending -- measured here, or summed over the ranks of a distributed run -- becomes the run's."""
        self.load_state_dict(start)
        for n in set(self.accounts) - set(start.get("accounts") or {}):
            self.accounts[n] = Account()  # opened during the step: its counts are all in ``spent``
        self.queries += spent.queries
        self.eval_queries += spent.eval_queries
        for n, a in spent.accounts.items():
            mine = self.account(n)
            for k, v in asdict(a).items():
                setattr(mine, k, getattr(mine, k) + v)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"queries": self.queries, "eval_queries": self.eval_queries,
                "accounts": {n: asdict(a) for n, a in self.accounts.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.queries = int(state["queries"])
        self.eval_queries = int(state.get("eval_queries", 0))
        for name, acc in (state.get("accounts") or {}).items():
            self.accounts[name] = Account(**{k: int(v) for k, v in acc.items()})

    def __repr__(self) -> str:
        return (f"QueryLedger(queries={self.queries}, max_queries={self.max_queries}, "
                f"rows={ {n: a.rows for n, a in self.accounts.items()} })")
