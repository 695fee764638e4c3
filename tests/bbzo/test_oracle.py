import numpy as np
import pytest
import torch
from torch import nn

from bbzo import BudgetExceeded, FunctionOracle, ModuleOracle, OracleError
from tests.helpers import SpyOracle


def test_counts_rows_and_calls_in_its_ledger():
    o = SpyOracle(3, 2)
    o.query(torch.randn(4, 3))
    o.query(torch.randn(5, 3))
    assert (o.rows_used, o.calls_used) == (9, 2) and o.ledger.rows(o) == 9 and o.row_counts == [4, 5]


def test_refuses_inputs_that_require_grad():
    o = SpyOracle(3, 2)
    with pytest.raises(OracleError, match="query-only"):
        o.query(torch.randn(2, 3, requires_grad=True))
    assert o.calls_used == 0


def test_nan_answer_names_oracle_and_bad_rows():
    def sim(x):
        out = x.sum(1, keepdim=True).clone()
        out[1] = float("nan")
        out[3] = float("inf")
        return out

    o = FunctionOracle(sim, name="my-solver")
    with pytest.raises(OracleError, match=r"my-solver returned NaN/inf in 2 of 5 rows \(first bad row 1\)"):
        o.query(torch.randn(5, 3))


def test_wrong_shapes_and_dtypes():
    o = FunctionOracle(lambda x: x[:-1], name="short")
    with pytest.raises(OracleError, match="one row per input row"):
        o.query(torch.randn(4, 3))
    o = FunctionOracle(lambda x: (x > 0).long(), name="ints")
    with pytest.raises(OracleError, match="floating dtype"):
        o.query(torch.randn(4, 3))
    o = FunctionOracle(lambda x: x, input_shape=(3,), output_shape=(2,), name="decl")
    with pytest.raises(OracleError, match=r"each input row must have shape \(3,\)"):
        o.query(torch.randn(4, 5))
    with pytest.raises(OracleError, match=r"declared output_shape is \(2,\)"):
        o.query(torch.randn(4, 3))


def test_budget_raises_before_the_call():
    calls = []
    o = FunctionOracle(lambda x: (calls.append(len(x)), x)[1], max_rows=10, name="budgeted")
    o.query(torch.randn(6, 2))
    with pytest.raises(BudgetExceeded, match="would use 12 of a budget of 10"):
        o.query(torch.randn(6, 2))
    assert calls == [6] and o.rows_used == 6
    o.query(torch.randn(4, 2))
    assert o.rows_used == 10
    o = FunctionOracle(lambda x: x, max_calls=1)
    o.query(torch.randn(1, 1))
    with pytest.raises(BudgetExceeded, match="call budget"):
        o.query(torch.randn(1, 1))


def test_numpy_function_oracle_and_module_oracle():
    o = FunctionOracle(lambda a: np.tanh(a), numpy=True)
    x = torch.randn(3, 2, dtype=torch.float64)
    assert torch.allclose(o.query(x), torch.tanh(x))
    net = nn.Linear(2, 3)
    mo = ModuleOracle(net)
    out = mo.query(torch.randn(4, 2))
    assert out.shape == (4, 3) and not out.requires_grad
    assert not any(p.requires_grad for p in net.parameters())


def test_conditions_reach_only_oracles_that_take_them():
    import pytest
    import torch

    from bbzo.errors import OracleError
    from bbzo.oracle import FunctionOracle, Oracle

    class Scaled(Oracle):
        def _query(self, inputs, scale):
            return inputs * scale[:, None]

    x = torch.ones(3, 2)
    assert torch.equal(Scaled().query(x, torch.tensor([1.0, 2.0, 3.0]))[:, 0], torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(OracleError, match="one row per input row"):
        Scaled().query(x, torch.ones(2))
    with pytest.raises(OracleError, match="requires grad"):
        Scaled().query(x, torch.ones(3, requires_grad=True))
    with pytest.raises(OracleError, match="takes no per-row conditions"):
        FunctionOracle(lambda t: t).query(x, torch.ones(3))


# ---------------------------------------------------------------------------- common random numbers
def test_a_common_random_numbers_block_hands_its_seed_to_oracles_that_take_one():
    from bbzo.oracle import Oracle, common_random_numbers, current_seed

    seen = []

    def noisy(x, seed=None):
        seen.append(seed)
        return x + (0.0 if seed is None else seed)

    takes = FunctionOracle(noisy, numpy=True)
    ignores = FunctionOracle(lambda x: x * 2, numpy=True)

    class Split(Oracle):  # a subclass with a seed parameter and a max_batch: every part gets the same seed
        def __init__(self):
            super().__init__(max_batch=2)

        def _query(self, inputs, seed=None):
            seen.append(("split", seed))
            return inputs

    assert takes.accepts_seed and not ignores.accepts_seed and Split().accepts_seed
    assert not SpyOracle(2, 2).accepts_seed
    x = torch.zeros(5, 1, dtype=torch.float64)
    assert torch.equal(takes.query(x), x) and seen == [None]
    with common_random_numbers(7) as s:
        assert s == 7 and current_seed() == 7
        assert torch.equal(takes.query(x), x + 7)
        assert torch.equal(ignores.query(x), x)  # a function without `seed` is called as before
        with common_random_numbers(None):  # None changes nothing
            assert current_seed() == 7
            with common_random_numbers(9):  # the inner block wins
                takes.query(x)
        Split().query(x)
    assert current_seed() is None
    assert seen == [None, 7, 9, ("split", 7), ("split", 7), ("split", 7)]


def test_seed_parameter_is_not_a_condition_and_bad_seeds_are_refused():
    from bbzo.errors import ConfigError
    from bbzo.oracle import Oracle, common_random_numbers

    class Plain(Oracle):
        def _query(self, inputs, seed=None):
            return inputs

    with pytest.raises(OracleError, match="takes no per-row conditions"):
        Plain().query(torch.zeros(3, 1), torch.zeros(3))
    for bad in (-1, 2 ** 31, 1.5, True):
        with pytest.raises(ConfigError, match=r"integer in \[0, 2\*\*31\)"):
            with common_random_numbers(bad):
                pass


def test_step_seeds_differ_between_steps_and_runs_and_are_pure():
    from bbzo.oracle import SEED_LIMIT, step_seed

    seeds = [step_seed(0, t) for t in range(1, 2001)]
    assert len(set(seeds)) == 2000 and all(0 <= s < SEED_LIMIT for s in seeds)
    assert step_seed(0, 5) == step_seed(0, 5) != step_seed(1, 5)
    assert step_seed(0, 1) == 502393375  # pinned: a resumed run must hand the oracle the same seeds
