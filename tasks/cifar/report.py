"""What a CIFAR-10 run shows: the results table, the per-class table, and loss / accuracy curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from bbzo.config import as_plain
from bbzo.listeners import read_jsonl, save_figure

from .settings import METHOD_NAMES

__all__ = ["results_table", "per_class_table", "plot_curves", "evaluate_run"]


def results_table(rows: Sequence[dict[str, Any]]) -> str:
    """One row per method. ``s/epoch`` is the training steps' time alone; ``set-up`` is data, model and (DeepZero)
    the ZO-GraSP score; ``wall`` is both (evaluations excluded). A query is one parameter set on a minibatch."""
    head = ("| method | model | params | queries/step | steps | epochs | total queries | score queries | set-up [s] "
            "| training [s] | s/epoch (steps only) | test acc before [%] | test acc after [%] |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        lines.append(f"| {METHOD_NAMES.get(r['method'], r['method'])} | {r['model']} | {r['params']:,} | "
                     f"{r['queries_per_step']:,} | {r['steps']} | {r['epochs']} | {r['queries']:,} | "
                     f"{r.get('score_queries') or 0:,} | {r.get('setup_s')} | {r.get('train_s')} | "
                     f"{r.get('train_s_per_epoch')} | {r['test_acc_before']:.2f} | {r['test_acc']:.2f} |")
    return "\n".join(lines)


def per_class_table(evals: dict[str, dict[str, Any]], classes: Sequence[str]) -> str:
    names = list(evals)
    lines = ["| class | " + " | ".join(METHOD_NAMES.get(n, n) for n in names) + " |", "|" + "---|" * (len(names) + 1)]
    for i, c in enumerate(classes):
        lines.append(f"| {c} | " + " | ".join(f"{evals[n]['per_class'][i]:.1f}" for n in names) + " |")
    lines.append("| **all** | " + " | ".join(f"**{evals[n]['test_acc']:.2f}**" for n in names) + " |")
    return "\n".join(lines)


def _smooth(v: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(v):
        acc += x
        if i >= k:
            acc -= v[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_curves(folder: Path, methods: Sequence[str], title: str) -> Optional[Path]:
    """``curves.png``: training loss and test accuracy against epochs and against queries, one curve per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    drawn = False
    for m in methods:
        path = folder / m / "metrics.jsonl"
        if not path.exists():
            continue
        rows = read_jsonl(path)
        if not rows:
            continue
        spe = rows[0].get("epoch_steps") or 1
        label = METHOD_NAMES.get(m, m)
        ep = [r["step"] / spe for r in rows]
        qs = [r.get("queries_used", 0) for r in rows]
        loss = _smooth([r["loss"] for r in rows], max(1, spe // 4))
        axes[0, 0].plot(ep, loss, label=label)
        axes[0, 1].plot(qs, loss, label=label)
        ev = [r for r in rows if "eval_test_acc" in r]
        train = folder / m / "train.json"
        if train.exists():  # the accuracy before the first step
            import json
            first = json.loads(train.read_text()).get("eval_initial")
            if first:
                ev = [{"step": 0, "queries_used": 0, "eval_test_acc": first["test_acc"]}, *ev]
        axes[1, 0].plot([r["step"] / spe for r in ev], [r["eval_test_acc"] for r in ev], "o-", ms=3, label=label)
        axes[1, 1].plot([r.get("queries_used", 0) for r in ev], [r["eval_test_acc"] for r in ev], "o-", ms=3, label=label)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for ax in axes[:, 1]:
        ax.set_xlabel("loss queries (minibatch evaluations; FO: none)")
        ax.set_xscale("symlog")
    for ax in axes[:, 0]:
        ax.set_xlabel("epoch")
    for ax in axes[0]:
        ax.set_ylabel("training loss (running mean)")
    for ax in axes[1]:
        ax.set_ylabel("test accuracy [%]")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, folder / "curves.png")


def evaluate_run(s: Any, run: Any, summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The run's results: one row per finished method, the table and the curves (the task's ``evaluate``)."""
    rows = []
    for name, t in summaries.items():
        if t.get("status") != "done":
            continue
        rows.append({"method": name, "model": s.model, "params": t["params"], "queries_per_step": t["queries_per_step"],
                     "steps": t["steps"], "epochs": t.get("epochs"), "queries": t["queries"], "wall_s": t["wall_s"],
                     "setup_s": t.get("setup_s"), "train_s": t.get("train_s"),
                     "train_s_per_epoch": t.get("train_s_per_epoch"),
                     "test_acc_before": t["eval_initial"]["test_acc"], "test_acc": t["eval_final"]["test_acc"],
                     "test_loss": t["eval_final"]["test_loss"], "final_train_loss": t.get("final_train_loss"),
                     "zeroth_order": t["zeroth_order"], "score_queries": t.get("score_queries", 0)})
    plots = []
    if run.plots:
        p = plot_curves(run.folder, [r["method"] for r in rows], f"CIFAR-10, {s.model}: loss and test accuracy")
        plots = [str(p)] if p is not None else []
    data = run.shared  # a CifarData (prepare_run)
    return {"config": as_plain(s), "data": {"source": data.source, "train": int(data.train_x.shape[0]),
                                            "test": int(data.test_x.shape[0]),
                                            "evaluated_on": "validation" if s.val_images else "test"},
            "results": rows, "table": results_table(rows), "plots": plots}
