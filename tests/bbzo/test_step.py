"""The one owner of a step: ask -> executor -> ledger.settle -> policy.resolve -> tell, and the house rules it keeps."""

import ast
from pathlib import Path

import pytest
import torch

import bbzo
from bbzo.adapters import make_adapter
from bbzo.ledger import QueryLedger
from bbzo.parallel import SerialExecutor
from bbzo.step import Evaluation, Request, estimate, query_cost
from tests.helpers import SpyOracle, mlp64

ROOT = Path(__file__).resolve().parents[2]


def _setup():
    torch.manual_seed(0)
    model = mlp64()
    oracle = SpyOracle(3, 2, name="spy")
    obj = bbzo.OracleObjective(oracle, lambda a, out, inp, t: a.pow(2).sum(1), needs_inputs=False)
    return model, oracle, obj, torch.randn(6, 4, dtype=torch.float64)


def test_a_step_charges_the_ledger_once_and_advances_the_state():
    model, oracle, obj, x = _setup()
    ledger = QueryLedger(max_queries=40)
    ledger.attach(oracle)
    est = bbzo.create_estimator("rge", q=5)
    res = estimate(make_adapter(model), est, obj, x, None, ledger=ledger)
    assert res.state.step == 1 and res.queries == 6 == ledger.queries and ledger.rows(oracle) == 6 * 6
    assert res.evaluation.spent.queries == 6 and res.evaluation.sizes == [5]
    res2 = estimate(make_adapter(model), est, obj, x, None, ledger=ledger, state=res.state)
    assert res2.state.step == 2 and ledger.queries == 12
    assert not all(torch.equal(res.grads[k], res2.grads[k]) for k in res.grads)  # new directions from the new state
    with pytest.raises(bbzo.BudgetExceeded):  # checked before the call that would exceed it: nothing is lost
        estimate(make_adapter(model), bbzo.create_estimator("cge"), obj, x, None, ledger=ledger)


def test_the_chain_rule_learns_the_output_width_on_its_first_step():
    model, oracle, obj, x = _setup()
    est = bbzo.create_estimator("oracle_cge")
    params = {n: p.detach() for n, p in model.named_parameters()}
    with pytest.raises(bbzo.ConfigError, match="give width= or let one step run"):
        est.query_cost(params)
    res = estimate(make_adapter(model), est, obj, x, None)
    assert res.state.width == 3 and est.query_cost(params, res.state) == 4 == res.queries


def test_query_cost_includes_what_the_failure_policy_needs():
    model = mlp64()
    params = {n: p.detach() for n, p in model.named_parameters()}
    est = bbzo.create_estimator("cge", difference="central")
    d = sum(p.numel() for p in params.values())
    assert query_cost(est, params, est.init(params)) == 2 * d
    assert query_cost(est, params, est.init(params), bbzo.FailurePolicy("penalize")) == 2 * d + 1
    assert query_cost(est, params, est.init(params), bbzo.FailurePolicy("skip")) == 2 * d


def test_requests_are_values_that_say_what_they_cost():
    assert Request().cost == 0 and Request(base=True).cost == 1 and Request(gradient="surrogate").cost == 1
    assert Request(gradient="objective").cost == 0
    with pytest.raises(bbzo.ConfigError, match="gradient must be one of"):
        Request(gradient="hessian")
    ev = Evaluation(torch.zeros(0, dtype=torch.float64))
    assert ev.spent.queries == 0 and ev.per_sample is None


def test_executors_n_shards_give_the_same_step():
    model, oracle, obj, x = _setup()
    est = bbzo.create_estimator("cge", mu=1e-6)
    a = estimate(make_adapter(model, max_chunk=5), est, obj, x, None)
    b = estimate(make_adapter(model, max_chunk=5), est, obj, x, None, executor=SerialExecutor(3))
    assert all(torch.equal(a.grads[k], b.grads[k]) for k in a.grads) and a.queries == b.queries


# ---------------------------------------------------------------------------- the house rules
def _imports(path: Path) -> list[str]:
    mods = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mods.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            mods += [a.name for a in node.names]
    return mods


def test_estimators_never_import_executors_or_adapters():
    for path in sorted((ROOT / "bbzo" / "estimators").glob("*.py")):
        for mod in _imports(path):
            assert not any(part in mod for part in ("parallel", "adapters")), f"{path.name} imports {mod}"


def test_probes_are_data_and_import_no_adapter():
    assert not [m for m in _imports(ROOT / "bbzo" / "probes.py") if "adapters" in m]


#: private members of other libraries that bbzo uses on purpose: namedtuple's public _replace/_asdict/_fields, torch's
#: scheduler _last_lr and default store, and nn.Module._apply (how a module moves the modules it holds, in its own _apply)
ALLOWED = {"_replace", "_asdict", "_fields", "_last_lr", "_get_default_store", "_apply"}


def test_no_module_reaches_into_another_objects_private_members():
    bad = []
    for top in ("bbzo", "oracles", "tasks", "cli"):
        for path in sorted((ROOT / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                    continue
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls") or node.attr in ALLOWED:
                    continue
                if isinstance(owner, ast.Call) and getattr(owner.func, "id", None) == "type" and \
                        [ast.unparse(a) for a in owner.args] == ["self"]:
                    continue  # type(self)._x: the object's own class
                if isinstance(owner, ast.Call) and getattr(owner.func, "id", None) == "super":
                    continue
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, "\n".join(bad)
