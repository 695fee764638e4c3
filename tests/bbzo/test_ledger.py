"""The query ledger: one place for queries and rows per oracle, uncharged evaluation, budgets, exact restore;
and the Oracle base's max_batch, close() and error wrapping."""

import pytest
import torch

import bbzo
from bbzo import BudgetExceeded, ConfigError, FunctionOracle, OracleError
from bbzo.ledger import QueryLedger
from bbzo.objective import OracleObjective, as_objective
from tests.helpers import SpyOracle, grad, mlp64


def test_rows_and_calls_are_counted_per_oracle_and_evaluation_is_apart():
    ledger = QueryLedger()
    denoiser, classifier = SpyOracle(3, 3, name="denoiser"), SpyOracle(3, 2, name="classifier")
    ledger.attach(denoiser)
    ledger.attach(classifier)
    denoiser.query(torch.randn(4, 3))
    classifier.query(torch.randn(4, 3))
    classifier.query(torch.randn(6, 3))
    with ledger.evaluation():
        classifier.query(torch.randn(100, 3))
        ledger.charge_queries(50)
    assert (ledger.rows("denoiser"), ledger.rows(classifier), ledger.rows()) == (4, 10, 14)
    assert ledger.calls(classifier) == 2 and ledger.accounts["classifier"].eval_rows == 100
    assert classifier.rows_used == 10 and ledger.eval_queries == 50 and ledger.queries == 0
    with pytest.raises(ConfigError, match="already counts an oracle named 'classifier'"):
        ledger.attach(SpyOracle(3, 2, name="classifier"))


def test_budgets_in_both_units_are_checked_before_the_call():
    ledger = QueryLedger(max_queries=10, max_rows=20)
    seen = []
    o = ledger.attach(FunctionOracle(lambda x: (seen.append(len(x)), x)[1], name="sim"))
    ledger.charge_queries(8)
    with pytest.raises(BudgetExceeded, match="would use 11 of a budget of 10 queries"):
        ledger.charge_queries(3)
    assert ledger.queries == 8
    o.query(torch.randn(15, 2))
    with pytest.raises(BudgetExceeded, match="run's budget of 20 oracle rows"):
        o.query(torch.randn(6, 2))
    assert seen == [15] and o.rows_used == 15  # nothing was run, nothing counted
    with ledger.evaluation():  # evaluation is never charged
        o.query(torch.randn(50, 2))
        ledger.charge_queries(100)
    o.max_rows = 16
    with pytest.raises(BudgetExceeded, match="sim: this call of 2 rows would use 17 of a budget of 16"):
        o.query(torch.randn(2, 2))


def test_state_round_trips_exactly():
    ledger = QueryLedger()
    o = ledger.attach(SpyOracle(3, 2, name="a"))
    o.query(torch.randn(5, 3))
    ledger.charge_queries(7)
    with ledger.evaluation():
        o.query(torch.randn(2, 3))
    again = QueryLedger()
    again.load_state_dict(ledger.state_dict())
    assert again.state_dict() == ledger.state_dict() and again.rows("a") == 5 and again.queries == 7


def test_an_estimate_charges_its_queries_to_the_ledger_before_each_call():
    model = mlp64()
    x = torch.randn(8, 4, dtype=torch.float64)
    oracle = SpyOracle(3, 2)
    ledger = QueryLedger(max_queries=20)  # CGE on 51 parameters costs 52
    ledger.attach(oracle)
    loss = lambda out, t: oracle.query(out).pow(2).sum(1)  # noqa: E731
    with pytest.raises(BudgetExceeded):
        grad(model, loss, x, None, bbzo.create_estimator("cge"), ledger=ledger, max_chunk=8)
    assert ledger.queries <= 20 and oracle.rows_used == ledger.queries * 8  # the call that would exceed never ran


def test_max_batch_splits_large_calls_and_reassembles_them_in_order():
    sizes = []
    o = FunctionOracle(lambda x: (sizes.append(len(x)), x * 2)[1], max_batch=4, name="small-gpu")
    x = torch.arange(11.0).view(11, 1)
    assert torch.equal(o.query(x), 2 * x)
    assert sizes == [4, 4, 3] and o.rows_used == 11 and o.calls_used == 1
    with pytest.raises(ConfigError, match="max_batch"):
        FunctionOracle(lambda x: x, max_batch=0)


def test_exceptions_of_the_black_box_become_one_line_naming_the_call():
    def sim(x):
        raise ValueError("mesh too coarse")

    ledger = QueryLedger()
    o = ledger.attach(FunctionOracle(sim, name="mesher"))
    ledger.step = 25
    with pytest.raises(OracleError, match=r"oracle mesher, call #1 \(step 25, 3 rows\) raised ValueError at "
                                          r"test_ledger.py:\d+: mesh too coarse"):
        o.query(torch.zeros(3, 2))
    assert o.rows_used == 0


def test_close_and_context_manager():
    closed = []

    class Held(FunctionOracle):
        def close(self):
            closed.append(True)

    with Held(lambda x: x) as o:
        o.query(torch.ones(1, 1))
    assert closed == [True]


def test_objectives_see_the_inputs_without_smuggling():
    seen = {}

    def loss(outputs, inputs, targets):
        seen["inputs"] = inputs.shape
        return (outputs.sum(1) - inputs.sum(1)) ** 2

    obj = as_objective(loss)
    assert obj.needs_inputs and not as_objective(lambda o, t: o.sum(1)).needs_inputs
    model = mlp64()
    x = torch.randn(5, 4, dtype=torch.float64)
    grad(model, loss, x, None, bbzo.create_estimator("cge"), max_chunk=3)
    assert seen["inputs"] == (15, 4)  # K = 3 parameter sets x B = 5 rows, the inputs repeated to match
    oracle = SpyOracle(7, 2)
    split = OracleObjective(oracle, lambda ans, out, inp, t: ans.pow(2).sum(1),
                            assemble=lambda out, inp, t: torch.cat([out, inp], 1))
    g = grad(model, split, x, None, bbzo.create_estimator("cge"))
    assert oracle.row_counts and all(n % 5 == 0 for n in oracle.row_counts) and g["0.weight"].abs().max() > 0


def test_spent_is_a_value_and_settle_applies_it_once():
    """What a step spent, summed over ranks, becomes the run's counts in one place (nothing counted twice)."""
    from bbzo.ledger import Account, Spent

    ledger = QueryLedger()
    o = FunctionOracle(lambda r: r.sum(1, keepdim=True), name="sim")
    ledger.attach(o)
    start = ledger.state_dict()
    ledger.charge_queries(3)
    o.query(torch.randn(6, 2))
    mine = ledger.spent_since(start)
    assert mine == Spent(3, 0, {"sim": Account(rows=6, calls=1)})
    other = Spent(2, 0, {"sim": Account(rows=4, calls=1), "new": Account(rows=1, calls=1)})  # another rank's share
    ledger.settle(start, mine + other)
    assert (ledger.queries, ledger.rows(o), ledger.calls(o), ledger.rows("new")) == (5, 10, 2, 1)
    ledger.settle(start, mine + other)  # idempotent: settling again from the same start gives the same counts
    assert (ledger.queries, ledger.rows(o)) == (5, 10)
    assert (mine + other).rows() == 11 and (mine + other).calls() == 3
