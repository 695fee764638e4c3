"""CIFAR-10 end to end: DeepZero training from scratch with FO / RGE / CGE baselines (DeepZero §6.1, Fig. 2).

* :mod:`.readers` -- the dataset files (an ``.npz`` or the official ``cifar-10-batches-py`` folder);
* :mod:`.data` -- the splits, class-balanced subsets, augmented batches as a function of (seed, step);
* :mod:`.settings` -- the settings and presets (paper / smoke / fig2);
* :mod:`.methods` -- fo, cge, rge, deepzero as trainings of the shared run lifecycle;
* :mod:`.report` -- the tables and the curves.

``bbzo cifar train|eval`` is the command line (:mod:`bbzo.cli.cifar`).
"""

from __future__ import annotations

from typing import Any

from bbzo.config import as_plain
from bbzo.run import Run
from bbzo.task import Task, register_task

from .data import CIFAR10_CLASSES, CifarBatches, CifarData, load_data, normalize
from .methods import accuracy, build_method, cross_entropy, make_model
from .readers import CIFAR_MEAN, CIFAR_STD, class_balanced_subset, load_image_classification
from .report import per_class_table, plot_curves, results_table
from .settings import METHOD_NAMES, METHODS, PRESETS, CifarSettings

__all__ = ["CifarSettings", "PRESETS", "METHODS", "METHOD_NAMES", "CifarData", "CifarBatches", "load_data",
           "normalize", "accuracy", "build_method", "cross_entropy", "make_model", "results_table",
           "per_class_table", "plot_curves", "load_image_classification", "class_balanced_subset", "CIFAR_MEAN",
           "CIFAR_STD", "CIFAR10_CLASSES", "TASK"]


def _prepare(s: CifarSettings, run: Run) -> CifarData:
    return load_data(s.data, s.subset, s.test_subset, s.seed, val_images=s.val_images)


def _evaluate(s: CifarSettings, run: Run, summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rows = []
    for name, t in summaries.items():
        if t.get("status") != "done":
            continue
        rows.append({"method": name, "model": s.model, "params": t["params"], "queries_per_step": t["queries_per_step"],
                     "steps": t["steps"], "epochs": t.get("epochs"), "queries": t["queries"], "wall_s": t["wall_s"],
                     "wall_s_per_epoch": t.get("wall_s_per_epoch"),
                     "test_acc_before": t["eval_initial"]["test_acc"], "test_acc": t["eval_final"]["test_acc"],
                     "test_loss": t["eval_final"]["test_loss"], "final_train_loss": t.get("final_train_loss"),
                     "zeroth_order": t["zeroth_order"], "score_queries": t.get("score_queries", 0)})
    plots = []
    if run.plots:
        p = plot_curves(run.folder, [r["method"] for r in rows], f"CIFAR-10, {s.model}: loss and test accuracy")
        plots = [str(p)] if p is not None else []
    data: CifarData = run.shared
    return {"config": as_plain(s), "data": {"source": data.source, "train": int(data.train_x.shape[0]),
                                            "test": int(data.test_x.shape[0]),
                                            "evaluated_on": "validation" if s.val_images else "test"},
            "results": rows, "table": results_table(rows), "plots": plots}


TASK = register_task(Task(
    name="cifar", settings=CifarSettings, trainings=lambda s: s.method, build=build_method, evaluate=_evaluate,
    prepare=_prepare, training_files=("model.pt", "lpr.json"),
    description="CIFAR-10 from scratch: DeepZero (Sparse-CGE, ZO-GraSP) with FO / RGE / CGE baselines"))
