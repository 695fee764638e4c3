"""The measurements behind ZO-SOL's defaults (README, "What we decided"). Prints JSON.

On the demo preset's data (generated or reused from --data-dir):

1. ``fd_step``: cosine between Sparse-CGE through the query-only oracle and FO-SOL's autograd gradient
   (PhiFlow's torch backend), on 100 last-layer coordinates + biases, for several mu / difference modes;
2. ``one_step_error``: how systematic the low-fidelity solver's one-step error is (|mean over samples|
   divided by mean |error|) and SRC's normalised one-step loss;
3. ``init``: one-step loss of a default-initialised corrector vs SRC's (why the last layer starts at 0);
4. ``non_lr``: NON's one-step loss after 200 steps at lr 3e-3 and 1e-3 (the 8-channel ReLU net dies at 3e-3).

    .venv/bin/python benchmarks/sol_diagnostics.py --out benchmarks/results/sol_diagnostics.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=Path("runs/sol-data"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)

    import bbzo

    from bbzo.step import estimate
    from bbzo.adapters import LoopAdapter
    from bbzo.oracles.karman import KarmanOracle, KarmanSolver, phi
    from bbzo.config import resolve
    from bbzo.provenance import provenance
    from bbzo.tasks.sol import RolloutBatches, SolSettings, features, generate, make_corrector, make_rollout, non_pairs
    from common import emit  # benchmarks/ is on sys.path when run as a script

    cfg, _ = resolve(SolSettings, {"preset": "demo", "data_dir": args.data_dir})
    data = generate(cfg.data, args.data_dir, progress=False)
    std = data.velocity_std()
    out: dict = {"benchmark": "sol_diagnostics", "preset": "demo",
                 "command": "python benchmarks/sol_diagnostics.py" + (f" --out {args.out}" if args.out else ""),
                 "provenance": provenance()}

    # 1. finite-difference step vs the autograd gradient through PhiFlow
    model = make_corrector(cfg, data)
    inputs, y = RolloutBatches(data.train, data.train_re, 4, 2, seed=0).get_batch(3)
    loss = make_rollout(KarmanSolver(cfg.data.low, backend="torch", jit=False).step, std)(model, inputs, y).mean()
    with phi().TORCH:
        fo = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    coords = {"net.4.weight": torch.arange(0, 400, 4), "net.4.bias": torch.arange(2)}
    ref = torch.cat([fo[n].flatten()[i] for n, i in coords.items()]).double()
    rows = []
    for mu, diff in [(5e-3, "forward"), (1e-3, "forward"), (1e-4, "forward"), (1e-3, "central")]:
        est = bbzo.create_estimator("sparse_cge", coords=coords, mu=mu, difference=diff)
        rollout = make_rollout(KarmanOracle(cfg.data.low, backend="torch").query, std)
        zo = estimate(LoopAdapter(model, sets_per_call=16), est, rollout, inputs, y)
        a = torch.cat([zo.grads[n].flatten()[i] for n, i in coords.items()]).double()
        rows.append({"mu": mu, "difference": diff, "cosine_to_fo": round(float(a @ ref / (a.norm() * ref.norm())), 4),
                     "rel_err": round(float((a - ref).norm() / ref.norm()), 4)})
    out["fd_step"] = rows

    # 2. how systematic the one-step error is
    p, re, tgt, _ = non_pairs(cfg, data)
    err = p - tgt
    s = std.view(1, 2, 1, 1)
    src_loss = float(((err / s) ** 2).mean())
    out["one_step_error"] = {"mae": round(float(err.abs().mean()), 6), "src_loss": src_loss,
                             "systematic_fraction": round(float(err.mean(0).abs().mean() / err.abs().mean()), 3)}

    # 3. default init vs zero last layer
    with torch.no_grad():
        default = make_corrector(cfg, data, zero_last=False)
        d_loss = float((((p + default(features(p, re)) - tgt) / s) ** 2).mean())
    out["init"] = {"default_init_loss": d_loss, "src_loss": src_loss, "ratio": round(d_loss / src_loss, 1)}

    # 4. NON learning rate
    res = {}
    for lr in (3e-3, 1e-3):
        m = make_corrector(cfg, data)
        opt = torch.optim.Adam(m.parameters(), lr=lr)
        g = torch.Generator().manual_seed(0)
        for _ in range(200):
            idx = torch.randint(0, p.shape[0], (32,), generator=g)
            loss = (((p[idx] + m(features(p[idx], re[idx])) - tgt[idx]) / s) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            res[f"{lr:g}"] = float((((p + m(features(p, re)) - tgt) / s) ** 2).mean())
    out["non_lr"] = {"one_step_loss_after_200_steps": res, "src_loss": src_loss}
    emit(out, args.out)


if __name__ == "__main__":
    main()
