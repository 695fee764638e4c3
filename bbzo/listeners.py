"""Listeners for the trainer's hooks: JSONL metrics, a progress bar, budgets, periodic evaluation, plots.

Each listener has ``attach(trainer)``; a :class:`~bbzo.run.Run` attaches the ones a task needs.
:func:`activity` and :func:`counting` make any other long phase (data, scoring, evaluation) show itself from
its first second: a bar whose elapsed time ticks even while nothing is counted yet.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

from .jsonio import dumps

__all__ = ["JSONLLogger", "ProgressBar", "BudgetGuard", "PeriodicEval", "read_jsonl", "save_figure", "plot_losses",
           "activity", "counting", "note"]

TICK_S = 1.0  # a bar on a terminal redraws (its elapsed time) this often while nothing is counted
TICK_S_LOG = 15.0  # ... and this often when stderr is a file (a line every few seconds, not hundreds)


def _tick_every() -> float:
    try:
        return TICK_S if sys.stderr.isatty() else TICK_S_LOG
    except (AttributeError, ValueError):
        return TICK_S_LOG


class _Ticker:
    """Redraws a tqdm bar every few seconds from a daemon thread, so a long first step or a phase that counts
    nothing yet still shows its elapsed time."""

    def __init__(self, bar: Any, every: Optional[float] = None) -> None:
        self.bar, self.every = bar, every if every is not None else _tick_every()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bbzo-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.bar.refresh()
            except Exception:  # noqa: BLE001 - a closed bar: nothing to draw
                return

    def stop(self) -> None:
        self._stop.set()


class _LinesAboveBar:
    """``sys.stderr`` while a training bar is drawn: whole lines written by anyone (a restarted simulator's
    notice, a warning) are printed above the bar on a line of their own instead of after it."""

    def __init__(self, target: Any) -> None:
        self.target, self._buf = target, ""

    def write(self, text: str) -> int:
        from tqdm.auto import tqdm

        self._buf += text
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            tqdm.write(line, file=self.target)
        return len(text)

    def flush(self) -> None:
        if self._buf:
            self.write("\n")
        self.target.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...
        return getattr(self.target, name)


def _screen() -> Any:
    """The stream bars draw on: stderr itself, not the line-wise wrapper a training bar puts around it."""
    err = sys.stderr
    return err.target if isinstance(err, _LinesAboveBar) else err


def note(text: str) -> None:
    """One line to stderr that does not break a progress bar on the screen (and starts on its own line)."""
    from tqdm.auto import tqdm

    tqdm.write(text, file=_screen())


@contextlib.contextmanager
def counting(desc: str, total: Optional[int] = None, unit: str = "it", enabled: bool = True,
             leave: bool = False) -> Iterator[Callable[[int], None]]:
    """A bar for a phase that counts ``total`` units (``tick(n)`` adds n); shown from its first second.

    ``leave=False``: the bar disappears when the phase ends (an evaluation inside a training's bar).
    """
    if not enabled:
        yield lambda n=1: None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True, file=_screen())
    bar.refresh()
    ticker = _Ticker(bar)
    try:
        yield lambda n=1: bar.update(n)
    finally:
        ticker.stop()
        bar.close()


@contextlib.contextmanager
def activity(desc: str, enabled: bool = True, what: str = "") -> Iterator[None]:
    """A phase with nothing to count (loading, ZO-GraSP scoring): a line that says what runs, its elapsed time
    ticking, and ``desc: done in X s`` at the end. ``what``: how much work it is (``"386 queries"``)."""
    if not enabled:
        yield
        return
    import time

    from tqdm.auto import tqdm

    label = f"{desc} ({what})" if what else desc
    bar = tqdm(total=None, desc=label, bar_format="{desc}: {elapsed}", leave=False, dynamic_ncols=True,
               file=_screen())
    bar.refresh()
    ticker = _Ticker(bar)
    t0 = time.perf_counter()
    ok = False
    try:
        yield
        ok = True
    finally:
        ticker.stop()
        bar.close()
        if ok:
            note(f"{label}: done in {time.perf_counter() - t0:.1f} s")


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
        row = {**self.extra, **status}  # written as strict JSON: a NaN/inf number becomes null
        with self.path.open("a") as f:
            f.write(dumps(row) + "\n")

    def truncate_after(self, trainer: Any) -> None:
        self.truncate(trainer.step_count)

    def truncate(self, step: int) -> None:
        """Drop the rows of steps after ``step`` (a resumed run rewrites them)."""
        if not self.path.exists():
            return
        keep = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        self.path.write_text("".join(dumps(r) + "\n" for r in keep))


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
    """tqdm bar of the training steps, shown when the first step starts (its elapsed time ticks during a long
    step): the loss and, for a zeroth-order estimator, queries/s and the queries used; a first-order training
    (no queries) shows its seconds per step instead."""

    def __init__(self, desc: str = "zo", disable: bool = False) -> None:
        self.desc, self.disable = desc, disable
        self.bar: Any = None
        self._ticker: Optional[_Ticker] = None
        self._stderr: Any = None

    def attach(self, trainer: Any) -> "ProgressBar":
        trainer.before_step.append(self._open)
        trainer.after_step.append(self)
        return self

    def _open(self, trainer: Any) -> None:
        if self.bar is not None or self.disable:
            return
        from tqdm.auto import tqdm
        self.bar = tqdm(total=trainer.max_steps, initial=trainer.step_count, desc=self.desc, unit="step",
                        dynamic_ncols=True, file=_screen())
        if trainer.step_count == 0 or not getattr(trainer, "status", None):
            self.bar.set_postfix_str(f"step {trainer.step_count + 1} running", refresh=True)
        self._ticker = _Ticker(self.bar)
        if not isinstance(sys.stderr, _LinesAboveBar):
            self._stderr, sys.stderr = sys.stderr, _LinesAboveBar(sys.stderr)

    def __call__(self, trainer: Any, status: dict[str, Any]) -> None:
        if self.disable:
            return
        if self.bar is None:
            self._open(trainer)
            self.bar.n = trainer.step_count - 1
        self.bar.update(1)
        info = getattr(getattr(trainer, "estimator", None), "info", None)
        if info is not None and not info.zeroth_order:
            self.bar.set_postfix(loss=f"{status['loss']:.4g}", s_per_step=f"{status.get('step_time', 0):.2f}",
                                 refresh=False)
        else:
            self.bar.set_postfix(loss=f"{status['loss']:.4g}", q_per_s=f"{status['queries_per_s']:.0f}",
                                 queries=status["queries_used"], refresh=False)
        if trainer.done:
            self.close()

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
            self._ticker = None
        if self._stderr is not None:
            if isinstance(sys.stderr, _LinesAboveBar):
                sys.stderr.flush()
                sys.stderr = self._stderr
            self._stderr = None
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


def _eval_losses(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The ``eval_*`` keys of the rows that hold a loss (``eval_val_loss``, ``eval_test_loss``)."""
    keys = {k for r in rows for k, v in r.items() if k.startswith("eval_") and "loss" in k and isinstance(v, (int, float))}
    return sorted(keys)


def plot_losses(path: Union[str, Path], curves: Mapping[str, Sequence[Mapping[str, Any]]], title: str = "") -> Optional[Path]:
    """Loss against steps and against queries, one colour per training; ``curves``: label -> JSONL rows.

    The training loss is the minibatch loss of each step (solid); a loss measured by the periodic evaluation
    (``eval_val_loss`` of ``bbzo train --eval-every``, a task's ``eval_test_loss``) is drawn dashed with its
    markers. Trainings that made no queries (first-order references) appear in the steps panel only. A query
    is one parameter set evaluated on the step's minibatch (the ledger's count).
    Rows may name their loss in an ``objective`` field (a training's ``log_extra``): trainings of different
    objectives (a one-step loss, an unrolled loss) are never drawn on one axis -- each objective gets its own row
    of panels, with the objective in the axis label.
    """
    rows_of = {k: list(v) for k, v in curves.items()}
    train = {k: [r for r in v if r.get("loss") is not None] for k, v in rows_of.items()}
    if not any(train.values()):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[Any, list[str]] = {}
    for label, rows in train.items():
        if rows:
            groups.setdefault(rows[0].get("objective"), []).append(label)
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.8 * len(groups)), squeeze=False)
    for (objective, labels), (a, b) in zip(groups.items(), axes):
        values = [r["loss"] for label in labels for r in train[label]]
        for label in labels:
            rows, all_rows = train[label], rows_of[label]
            evals = {k: [r for r in all_rows if isinstance(r.get(k), (int, float))] for k in _eval_losses(all_rows)}
            values += [r[k] for k, rs in evals.items() for r in rs]
            line, = a.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=f"{label}: training loss (minibatch)")
            queried = any(r.get("queries_used") for r in rows)
            if queried:
                b.plot([r["queries_used"] for r in rows], [r["loss"] for r in rows], color=line.get_color(),
                       label=f"{label}: training loss (minibatch)")
            for k, rs in evals.items():
                name = k[len("eval_"):].replace("_", " ").replace("val ", "validation ")
                kw = dict(color=line.get_color(), linestyle="--", marker="o", markersize=3, label=f"{label}: {name}")
                a.plot([r["step"] for r in rs], [r[k] for r in rs], **kw)
                if queried:
                    b.plot([r.get("queries_used", 0) for r in rs], [r[k] for r in rs], **kw)
        positive = all(v is not None and v > 0 for v in values)
        ylabel = "loss" if objective is None else f"loss\n({objective})"
        for ax, x in ((a, "step"), (b, "queries (parameter sets evaluated on the minibatch)")):
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
