"""What a defense run shows: the certified-accuracy table (beside DeepZero's Table 2) and its plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from bbzo.listeners import save_figure

from .certify import ABSTAIN, accuracy_interval
from .settings import METHOD_NAMES

__all__ = ["PAPER_TABLE2", "certified_table", "finetune_table", "plot_certified", "predicted_table", "method_label"]

#: DeepZero Table 2 (ImageNet-10, ResNet-50 black box, DnCNN, 1,152 queries per gradient), certified accuracy %
PAPER_TABLE2 = {"fo": {"0": 89.33, "0.25": 81.67, "0.5": 68.87, "0.75": 49.80},
                "zo": {"0": 86.02, "0.25": 76.61, "0.5": 61.80, "0.75": 43.05},
                "zo-ae-ds": {"0": 63.60, "0.25": 52.80, "0.5": 43.13, "0.75": 32.73}}


def certified_table(results: Mapping[str, Mapping[str, float]], count: int, *, paper: bool = True) -> str:
    """Markdown: one row per method, certified accuracy (%) per radius, the 95% Clopper-Pearson interval at r = 0."""
    radii = list(next(iter(results.values())))
    head = "| method | " + " | ".join(f"r = {r}" for r in radii) + f" | r = 0, 95% CI ({count} images) |"
    lines = [head, "|" + "---|" * (len(radii) + 2)]
    for name, acc in results.items():
        low, high = accuracy_interval(acc[radii[0]], count)
        lines.append(f"| {METHOD_NAMES.get(name, name)} | " + " | ".join(f"{acc[r]:.2f}" for r in radii)
                     + f" | {low:.1f} - {high:.1f} |")
    if paper:
        for name, acc in PAPER_TABLE2.items():
            label = {"fo": "paper: FO-DS", "zo": "paper: DeepZero", "zo-ae-ds": "paper: ZO-AE-DS"}[name]
            lines.append(f"| {label} (ImageNet-10, 224 px) | " + " | ".join(
                f"{acc[r]:.2f}" if r in acc else "-" for r in radii) + " | |")
    return "\n".join(lines)


def predicted_table(results: Mapping[str, Mapping[str, float]], count: int) -> str:
    """Markdown: PREDICT's accuracy and abstention rate (%) per pipeline, with the accuracy's 95% interval."""
    lines = [f"| method | PREDICT accuracy [%] | abstain [%] | 95% CI ({count} images) |", "|---|---|---|---|"]
    for name, r in results.items():
        low, high = accuracy_interval(r["accuracy"], count)
        lines.append(f"| {METHOD_NAMES.get(name, name)} | {r['accuracy']:.2f} | {r['abstain']:.2f} | {low:.1f} - {high:.1f} |")
    return "\n".join(lines)


def method_label(row: Mapping[str, Any]) -> str:
    """A fine-tuning's name as its numbers say it ran (ZO-DS with its own q)."""
    name = METHOD_NAMES.get(row["method"], row["method"])
    if row["method"] == "zo-ds" and row.get("queries_per_step"):
        name = name[:-1] + f", q = {row['queries_per_step'] - 1})"
    return name


def finetune_table(rows: Sequence[dict[str, Any]]) -> str:
    """One row per method. A query is one parameter set of the denoiser evaluated on the step's minibatch of
    noisy images, i.e. ``batch`` classifier images; ``total`` includes ZO-GraSP's queries (``score``)."""
    head = ("| method | queries/step (parameter sets) | steps | total queries (parameter sets) | classifier images "
            "queried | set-up [s] | training [s] | noisy acc before [%] | after [%] |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        score = f" (score {r['score_queries']:,})" if r.get("score_queries") else ""
        lines.append(f"| {method_label(r)} | {r['queries_per_step']:,} | {r['steps']} | {r['queries']:,}{score} | "
                     f"{r.get('classifier_images', 0):,} | {r.get('setup_s')} | {r.get('train_s', r['wall_s'])} | "
                     f"{r['noisy_acc_before']:.2f} | {r['noisy_acc']:.2f} |")
    return "\n".join(lines)


def plot_certified(path: Path, rows: Mapping[str, Sequence[Mapping[str, Any]]], sigma: float, max_r: float,
                   limit: Optional[float] = None) -> Optional[Path]:
    """``certified_accuracy.png``: certified accuracy against radius, one curve per method.

    ``limit``: the largest radius the sample count can certify (a dotted line).
    """
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    grid = [max_r * i / 200 for i in range(201)]
    for name, rs in rows.items():
        acc = [100.0 * sum(1 for r in rs if r["correct"] and r["predict"] != ABSTAIN and r["radius"] >= t) / len(rs)
               for t in grid]
        ax.plot(grid, acc, label=METHOD_NAMES.get(name, name))
    ax.set_xlabel("L2 radius (pixels in [0, 1])")
    ax.set_ylabel("certified accuracy [%]")
    ax.set_title(f"certified accuracy, sigma = {sigma}")
    if limit is not None:
        ax.axvline(limit, color="grey", ls=":", lw=1, label=f"largest radius n certifies ({limit:.2f})")
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
