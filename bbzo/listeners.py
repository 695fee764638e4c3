"""Listeners for the trainer's hooks: JSONL metrics, a progress bar, budgets, periodic evaluation, plots.

Each listener has ``attach(trainer)``; a :class:`~bbzo.run.Run` attaches the ones a task needs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

__all__ = ["JSONLLogger", "ProgressBar", "BudgetGuard", "PeriodicEval", "read_jsonl", "save_figure", "plot_losses"]


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class JSONLLogger:
    """Append one JSON object per logged step to ``path``.

    On resume, lines of steps after the checkpoint are dropped, so the file matches the run exactly.
    """

    def __init__(self, path: Union[str, Path], extra: Optional[dict[str, Any]] = None) -> None:
        self.path = Path(path)
        self.extra = extra or {}
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def attach(self, trainer: Any) -> "JSONLLogger":
        trainer.on_log.append(self)
        trainer.on_resume.append(self.truncate_after)
        return self

    def __call__(self, trainer: Any, status: dict[str, Any]) -> None:
        row = {**self.extra, **{k: _clean(v) for k, v in status.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_after(self, trainer: Any) -> None:
        self.truncate(trainer.step_count)

    def truncate(self, step: int) -> None:
        """Drop the rows of steps after ``step`` (a resumed run rewrites them)."""
        if not self.path.exists():
            return
        keep = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def read_jsonl(path: Union[str, Path]) -> list[dict[str, Any]]:
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
    return rows


class ProgressBar:
    """tqdm bar showing loss, queries/s and total queries."""

    def __init__(self, desc: str = "zo", disable: bool = False) -> None:
        self.desc, self.disable = desc, disable
        self.bar: Any = None

    def attach(self, trainer: Any) -> "ProgressBar":
        trainer.after_step.append(self)
        return self

    def __call__(self, trainer: Any, status: dict[str, Any]) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=trainer.max_steps, initial=trainer.step_count - 1, desc=self.desc,
                            disable=self.disable, dynamic_ncols=True)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{status['loss']:.4g}", q_per_s=f"{status['queries_per_s']:.0f}",
                             queries=status["queries_used"], refresh=False)
        if trainer.done:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class BudgetGuard:
    """Stop cleanly before the step whose queries would exceed the ledger's ``max_queries``."""

    def attach(self, trainer: Any) -> "BudgetGuard":
        trainer.before_step.append(self)
        return self

    def __call__(self, trainer: Any) -> None:
        left = trainer.ledger.queries_left()
        if left is not None and trainer.query_cost() > left:
            trainer.stop("max_queries")


class PeriodicEval:
    """Every ``every`` steps, evaluate the model (uncharged: inside the ledger's evaluation scope).

    ``fn(model) -> {name: number}``; the numbers join the step's status as ``eval_<name>`` (so the JSONL
    log and the plots see them) and are kept in ``history``.
    """

    def __init__(self, fn: Callable[[Any], Mapping[str, Any]], every: int) -> None:
        self.fn, self.every = fn, int(every)
        self.history: list[dict[str, Any]] = []

    def attach(self, trainer: Any) -> "PeriodicEval":
        if self.every > 0:
            trainer.after_step.append(self)
        return self

    def __call__(self, trainer: Any, status: dict[str, Any]) -> None:
        if trainer.step_count % self.every and not trainer.done:
            return
        with trainer.ledger.evaluation():
            metrics = dict(self.fn(trainer.model))
        self.history.append({"step": trainer.step_count, **metrics})
        status.update({f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})


def save_figure(fig: Any, path: Union[str, Path], dpi: int = 120, tight: bool = True) -> Path:
    """Save a matplotlib figure as PNG (after ``tight_layout`` if ``tight``) and close it; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_losses(path: Union[str, Path], curves: Mapping[str, Sequence[Mapping[str, Any]]], title: str = "") -> Optional[Path]:
    """Training loss against steps and against queries, one line per training; ``curves``: label -> JSONL rows.

    Trainings that made no queries (first-order references) appear in the steps panel only. Rows may name
    their loss in an ``objective`` field (a training's ``log_extra``): trainings of different objectives (a
    one-step loss, an unrolled loss) are never drawn on one axis -- each objective gets its own row of
    panels, with the objective in the axis label.
    """
    curves = {k: [r for r in v if r.get("loss") is not None] for k, v in curves.items()}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[Any, dict[str, Sequence[Mapping[str, Any]]]] = {}
    for label, rows in curves.items():
        groups.setdefault(rows[0].get("objective"), {})[label] = rows
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.8 * len(groups)), squeeze=False)
    for (objective, group), (a, b) in zip(groups.items(), axes):
        positive = all(r["loss"] > 0 for rows in group.values() for r in rows)
        for label, rows in group.items():
            a.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=label)
            if any(r.get("queries_used") for r in rows):
                b.plot([r["queries_used"] for r in rows], [r["loss"] for r in rows], label=label)
        ylabel = "training loss" if objective is None else f"training loss\n({objective})"
        for ax, x in ((a, "step"), (b, "loss queries (parameter sets x minibatch)")):
            ax.set_xlabel(x)
            ax.set_ylabel(ylabel)
            if positive:
                ax.set_yscale("log")
            if ax.lines:
                ax.legend(fontsize=8)
        if not b.lines:
            b.text(0.5, 0.5, "no loss queries\n(first-order trainings)", ha="center", va="center",
                   transform=b.transAxes, fontsize=9, color="0.4")
            b.set_xticks([])
            b.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
