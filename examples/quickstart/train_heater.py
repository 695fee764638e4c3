"""The README's quick start: your model, your black box, one import line (run from the repository root)."""
import sys; sys.path.insert(0, "examples/custom_simulator")
import torch, bbzo
from heater import build, make_data, simulate   # a numpy simulator, an 82-parameter MLP, wanted temperatures

oracle = bbzo.FunctionOracle(simulate, numpy=True, name="heater")   # query-only: checked, counted, never differentiated
objective = bbzo.OracleObjective(oracle, lambda reached, settings, wanted, target: (reached - target).pow(2).mean(1))
model, (x, y) = build(), make_data(2048)
opt = torch.optim.Adam(model.parameters(), lr=0.05)
est, state = bbzo.create_estimator("cge", mu=1e-3), None             # or "rge", "oracle_cge", bbzo.masked(...)
ledger = bbzo.QueryLedger(max_queries=100_000); ledger.attach(oracle)  # a budget, checked before every call

for step in range(300):
    rows = torch.randint(0, len(x), (32,), generator=torch.Generator().manual_seed(step))
    opt.zero_grad()
    grads, state = bbzo.estimate_grad(model, objective, x[rows], y[rows], est, state, ledger=ledger)  # sets p.grad
    opt.step()
with torch.no_grad(), ledger.evaluation():                           # measuring is counted apart from training
    print(f"MSE {float(objective(model(x), x, y).mean()):.3f} °C² after {ledger.queries:,} queries")
