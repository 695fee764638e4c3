"""Evaluation of ZO-SOL methods: every test Re rolled out from the reference's first recorded frame.

MAE = mean |Δ| of (u, v) over the NCHW faces and all steps, per Re and overall. The solver is queried
as the black box (the run's ledger does not charge evaluation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from bbzo.errors import ConfigError

from .data import SolData, load
from .methods import features, karman_oracle, load_corrector
from .report import plot_results, results_table
from .settings import METHODS, SolSettings

__all__ = ["evaluate", "vorticity", "evaluate_run"]


@torch.no_grad()
def evaluate(s: SolSettings, data: SolData, corrector: Optional[nn.Module], *, keep_states: bool = False,
             split: str = "test") -> dict[str, Any]:
    """Roll every test Re (``split="train"``: every training Re, a validation for choosing settings) out
    from the first reference frame; MAE per Re, per step and overall."""
    dev = torch.device(s.device)
    oracle = karman_oracle(s, "phiflow-karman(eval)")
    frames, res = (data.test, data.test_re) if split == "test" else (data.train, data.train_re)
    ref = frames.to(dev)
    steps = min(s.eval_steps or ref.shape[1] - 1, ref.shape[1] - 1)
    state, re = ref[:, 0].clone(), res.to(dev).float()
    maes, states = [], [state.cpu()]
    with oracle.ledger.evaluation():
        for t in range(steps):
            state = oracle.query(state, re)
            if corrector is not None:
                state = state + corrector(features(state, re))
            maes.append((state - ref[:, t + 1]).abs().flatten(1).mean(1).cpu())
            if keep_states:
                states.append(state.cpu())
    mae = torch.stack(maes, 1)  # (R, steps)
    out = {"steps": steps, "mae_per_re": {f"{float(r):g}": round(float(m), 5) for r, m in zip(res, mae.mean(1))},
           "mae": round(float(mae.mean()), 5), "mae_over_time": [round(float(v), 5) for v in mae.mean(0)],
           "oracle_rows": oracle.ledger.account(oracle).eval_rows}
    if keep_states:
        out["states"] = torch.stack(states, 1)  # (R, steps + 1, 2, ny, nx)
    return out


def vorticity(state: torch.Tensor, setup: Any) -> torch.Tensor:
    """``(..., 2, ny, nx)`` -> ``(..., ny, nx)`` curl ``dv/dx - du/dy`` (central differences)."""
    dx, dy = setup.width / setup.nx, setup.height / setup.ny
    u, v = state[..., 0, :, :], state[..., 1, :, :]
    dvdx = torch.gradient(v, spacing=dx, dim=-1)[0]
    dudy = torch.gradient(u, spacing=dy, dim=-2)[0]
    return dvdx - dudy


def evaluate_run(s: SolSettings, out: Path, methods: tuple[str, ...] = METHODS, *, data: Optional[SolData] = None,
                 plots: bool = True, write_to: Optional[Path] = None) -> dict[str, Any]:
    """Evaluate every method trained in ``out`` (``src`` needs no training); write ``eval.json``,
    ``results.md`` and the plots into ``write_to`` (default: ``out``)."""
    torch.set_num_threads(1)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ConfigError(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}.")
    data = data or load(s.data, s.data_dir)
    dest = write_to or out
    dest.mkdir(parents=True, exist_ok=True)
    evals: dict[str, dict[str, Any]] = {}
    train: dict[str, dict[str, Any]] = {}
    skipped = []
    for m in methods:
        if m != "src" and not (out / m / "corrector.pt").exists():
            skipped.append(m)
            continue
        corr = None if m == "src" else load_corrector(s, data, out / m / "corrector.pt").eval()
        evals[m] = evaluate(s, data, corr, keep_states=plots)
        if s.validate:  # long rollouts on the training Re: what settings may be chosen by (never the test Re)
            evals[m]["val_mae"] = evaluate(s, data, corr, split="train")["mae"]
        tj = out / m / "train.json"
        train[m] = json.loads(tj.read_text()) if tj.exists() else {"method": m}
    if not evals:
        raise ConfigError(f"none of the methods {', '.join(methods)} is trained in {out}; train them first "
                          "(`bbzo sol train --method ... --out ...`) or include src.")
    summary = {"eval": {m: {k: v for k, v in ev.items() if k != "states"} for m, ev in evals.items()},
               "train": train, "skipped_untrained": skipped, "test_re": list(s.test_re)}
    (dest / "eval.json").write_text(json.dumps(summary, indent=1))
    md = results_table(evals, train)
    (dest / "results.md").write_text(md + "\n")
    summary["table"] = md
    summary["plots"] = [str(p) for p in plot_results(s, data, evals, dest)] if plots else []
    return summary
