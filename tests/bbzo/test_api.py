"""The public API: what a user's own loop needs, one import line, nothing internal."""

import torch

import bbzo


def test_the_top_level_is_the_users_vocabulary():
    assert len(bbzo.__all__) <= 30
    for internal in ("evaluate_sharded", "FunctionalAdapter", "StagedAdapter", "LoopAdapter", "as_objective", "estimate"):
        assert internal not in bbzo.__all__
    for name in ("estimate_grad", "Trainer", "create_estimator", "list_estimators", "masked", "chain", "Oracle",
                 "OracleObjective", "QueryLedger", "FailurePolicy", "BbzoError"):
        assert name in bbzo.__all__ and hasattr(bbzo, name)


def test_a_users_loop_with_one_import():
    """The README's quick start: your model, your black box, a torch optimizer; the state is a value you keep."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    box = bbzo.FunctionOracle(lambda u: u.pow(2).sum(1, keepdim=True), numpy=False, name="bowl")
    objective = bbzo.OracleObjective(box, lambda a, out, x, y: a[:, 0], needs_inputs=False)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    est, state = bbzo.create_estimator("oracle_cge", mu=1e-3), None
    x = torch.randn(32, 2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        grads, state = bbzo.estimate_grad(model, objective, x, None, est, state)  # sets p.grad
        opt.step()
        with torch.no_grad(), box.ledger.evaluation():  # measuring is not training: counted apart
            losses.append(float(objective(model(x), x, None).mean()))
    assert state.step == 30 and state.width == 2
    assert losses[-1] < 0.1 * losses[0]
    assert box.rows_used == 30 * 3 * 32  # width + 1 queries per step, 32 rows each
    assert box.ledger.account(box).eval_rows == 30 * 32
