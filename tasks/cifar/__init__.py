"""CIFAR-10 end to end: DeepZero training from scratch with FO / RGE / CGE baselines (DeepZero §6.1, Fig. 2).

* :mod:`.readers` -- the dataset files (an ``.npz`` or the official ``cifar-10-batches-py`` folder);
* :mod:`.data` -- the splits, class-balanced subsets, augmented batches as a function of (seed, step);
* :mod:`.settings` -- the settings and presets (paper / smoke / fig2);
* :mod:`.methods` -- fo, cge, rge, deepzero as trainings of the shared run lifecycle;
* :mod:`.report` -- the tables and the curves.

``bbzo cifar train|eval`` is the command line (:mod:`bbzo.cli.cifar`). This module declares the task; the
modules behind it (torchvision's transforms among them) are imported when a run starts or a name below is
first used, so ``bbzo cifar train --help`` starts at once.
"""

from __future__ import annotations

from typing import Any, Callable

from bbzo.task import Task, lazy_exports, later, register_task

from .settings import METHOD_NAMES, METHODS, PRESETS, CifarSettings

_EXPORTS = {  # public name -> the submodule that defines it (imported on first use, PEP 562)
    **{n: "data" for n in ("CIFAR10_CLASSES", "CifarBatches", "CifarData", "load_data", "normalize")},
    **{n: "methods" for n in ("accuracy", "build_method", "cross_entropy", "make_model")},
    **{n: "readers" for n in ("CIFAR_MEAN", "CIFAR_STD", "class_balanced_subset", "load_image_classification")},
    **{n: "report" for n in ("per_class_table", "plot_curves", "results_table")},
}

__all__ = ["CifarSettings", "PRESETS", "METHODS", "METHOD_NAMES", "TASK", *_EXPORTS]


__getattr__ = lazy_exports(__name__, _EXPORTS)


def _later(module: str, name: str) -> Callable[..., Any]:
    return later(__name__, module, name)


TASK = register_task(Task(
    name="cifar", settings=CifarSettings, trainings=lambda s: s.method, build=_later("methods", "build_method"),
    evaluate=_later("report", "evaluate_run"), prepare=_later("data", "prepare_run"),
    training_files=("model.pt", "lpr.json"),
    description="CIFAR-10 from scratch: DeepZero (Sparse-CGE, ZO-GraSP) with FO / RGE / CGE baselines"))
