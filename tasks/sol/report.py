"""What a ZO-SOL run shows: the MAE table (per test Re, vs SRC, costs) and the pictures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bbzo.listeners import save_figure

from .data import SolData
from .settings import METHOD_NAMES, SolSettings

__all__ = ["results_table", "plot_results"]


def _queries(tr: dict[str, Any]) -> Any:
    """ZO loss queries; '-' for methods that make none (first-order ones, SRC)."""
    return tr["queries"] if tr.get("zeroth_order", "queries" in tr) and tr.get("queries") else "-"


def _state_steps(tr: dict[str, Any]) -> Any:
    """States the black box stepped in training; FO-SOL's are forward steps of the white-box solver."""
    if tr.get("oracle_rows"):
        return tr["oracle_rows"]
    return tr.get("solver_state_steps", "-")


def results_table(evals: dict[str, dict[str, Any]], train: dict[str, dict[str, Any]]) -> str:
    res = list(next(iter(evals.values()))["mae_per_re"])
    head = "| method | " + " | ".join(f"Re {r}" for r in res) + " | test MAE | vs SRC | queries | solver state-steps | train wall [s] |"
    sep = "|" + "---|" * (len(res) + 6)
    src = evals.get("src", {}).get("mae")
    rows = []
    for m, ev in evals.items():
        tr = train.get(m, {})
        rel = f"{100 * (ev['mae'] / src - 1):+.1f}%" if src else "-"
        rows.append(f"| {METHOD_NAMES[m]} | " + " | ".join(f"{v:.4f}" for v in ev["mae_per_re"].values())
                    + f" | **{ev['mae']:.4f}** | {rel} | {_queries(tr)} | {_state_steps(tr)} | {tr.get('wall_s', '-')} |")
    return "\n".join([head, sep, *rows])


def plot_results(s: SolSettings, data: SolData, evals: dict[str, dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .evaluate import vorticity

    paths = []
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for m, ev in evals.items():
        ax.plot(range(1, ev["steps"] + 1), ev["mae_over_time"], label=f"{METHOD_NAMES[m]} ({ev['mae']:.4f})")
    ax.set_xlabel("solver step")
    ax.set_ylabel("velocity MAE (mean over test Re)")
    ax.set_title("Rollout error on held-out Reynolds numbers")
    ax.legend()
    paths.append(save_figure(fig, out / "mae_over_time.png"))

    low = s.data.low
    r = len(data.test_re) // 2
    t = next(iter(evals.values()))["steps"]
    panels = [(METHOD_NAMES[m], ev["states"][r, t]) for m, ev in evals.items() if "states" in ev]
    ref = vorticity(data.test[r, t], low)
    w = [vorticity(st, low) for _, st in panels]
    lim = float(torch.quantile(ref.abs().flatten(), 0.99)) or 1.0
    n = len(panels) + 1
    ext = (0, low.width, 0, low.height)
    fig, axes = plt.subplots(2, n, figsize=(1.9 * n + 1.2, 7.2), squeeze=False)
    for j, (title, wi) in enumerate([*zip([p[0] for p in panels], w), ("reference", ref)]):
        im = axes[0, j].imshow(wi.numpy(), origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim, extent=ext)
        axes[0, j].set_title(title, fontsize=8)
        if j < len(panels):
            err = (wi - ref).abs()
            im2 = axes[1, j].imshow(err.numpy(), origin="lower", cmap="magma", vmin=0, vmax=0.5 * lim, extent=ext)
            axes[1, j].set_title(f"|error| mean {float(err.mean()):.4f}", fontsize=8)
        else:
            axes[1, j].axis("off")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="vorticity")
    fig.colorbar(im2, ax=axes[1].tolist(), shrink=0.8, label="|vorticity error|")
    fig.suptitle(f"Re {float(data.test_re[r]):g} (held out), step {t}: corrected low-fidelity rollouts vs the "
                 "downsampled high-fidelity reference", fontsize=9)
    paths.append(save_figure(fig, out / "vorticity.png", tight=False))  # tight_layout fights shared colorbars
    return paths
