"""Certified black-box defense (DeepZero §6.2, App. G): a denoiser in front of a query-only classifier, then CERTIFY.

* :mod:`.data` -- image folders and array files, read lazily; noisy minibatches as a function of (seed, step);
* :mod:`.denoisers` -- any denoiser (DnCNN, module:attr, compiled files, an adapter after a frozen one),
  its architecture recorded in the files bbzo writes;
* :mod:`.classmap` -- ``--class-map`` and the class-count check made before anything runs;
* :mod:`.settings` -- the settings of ``pretrain`` / ``finetune`` / ``certify``;
* :mod:`.methods` -- MSE pretraining and the fine-tunings zo (DeepZero), fo (FO-DS, white-box), zo-ds;
* :mod:`.certify` -- Cohen et al.'s CERTIFY / PREDICT with exact Clopper-Pearson bounds (scipy), noise drawn on
  the device from each image's own generator;
* :mod:`.records` -- ``certify.tsv``, appended durably per image and read back by ``--resume``;
* :mod:`.report` -- the certified-accuracy table beside the paper's and its plot;
* :mod:`.stages` -- each stage's prepare / build / evaluate (the run lifecycle's side of the commands).

This module only declares the tasks; their modules (torchvision's transforms, scipy's bounds) are imported when
a stage runs or a name below is first used, so ``bbzo defense ... --help`` starts at once.

Every command loads and checks what it was given -- the classifier, every denoiser, the data's class list
against the classifier's outputs -- before it reads an image. The black box is
:class:`bbzo.oracles.classifier.ClassifierOracle`; ``bbzo defense ...`` is the command line.
"""

from __future__ import annotations

from typing import Any, Callable

from bbzo.task import Task, lazy_exports, later, register_task

from .certify import certify  # the function, not the submodule of the same name (light: scipy loads when used)
from .settings import (METHOD_NAMES, METHODS, CertifySettings, ClassifierSettings, DefenseBase, FinetuneSettings,
                       PretrainSettings)

_EXPORTS = {  # public name -> the submodule that defines it (imported on first use, PEP 562)
    **{n: "certify" for n in ("ABSTAIN", "RADII", "accuracy_interval", "certified_accuracy", "certify_dataset", "certify_images", "lower_confidence_bound", "max_radius", "predict",
                              "sample_counts")},
    **{n: "data" for n in ("NoisyBatches", "load_images", "open_images")},
    **{n: "methods" for n in ("budget_ratios", "load_denoiser", "make_denoiser", "make_oracle", "noisy_accuracy",
                              "psnr", "stability_targets")},
    **{n: "report" for n in ("PAPER_TABLE2", "certified_table", "finetune_table", "plot_certified")},
    **{n: "stages" for n in ("pipeline", "check_setup", "CERTIFY_FORMAT")},
}

__all__ = ["CLASSIFIER", "PRETRAIN", "FINETUNE", "CERTIFY", "ClassifierSettings", "CertifySettings",
           "FinetuneSettings", "PretrainSettings", "DefenseBase", "METHODS", "METHOD_NAMES", "certify", *_EXPORTS]


__getattr__ = lazy_exports(__name__, _EXPORTS)


def _later(module: str, name: str) -> Callable[..., Any]:
    return later(__name__, module, name)


CLASSIFIER = register_task(Task(
    name="defense-classifier", settings=ClassifierSettings, trainings=lambda s: [""],
    build=_later("classifier", "build_classifier"), evaluate=_later("classifier", "evaluate_classifier"),
    prepare=_later("classifier", "prepare_classifier"), training_files=("model.pt",),
    description="denoised smoothing, stage 0: train the classifier that plays the black box (first-order)"))

PRETRAIN = register_task(Task(
    name="defense-pretrain", settings=PretrainSettings, trainings=lambda s: [""],
    build=_later("methods", "build_pretrain"), evaluate=_later("stages", "evaluate_pretrain"),
    prepare=_later("stages", "prepare_pretrain"), training_files=("model.pt",),
    description="denoised smoothing, stage 1: pretrain a denoiser on MSE(D(x + delta), x) (first-order)"))

FINETUNE = register_task(Task(
    name="defense", settings=FinetuneSettings, trainings=lambda s: s.method,
    build=_later("methods", "build_finetune"), evaluate=_later("stages", "evaluate_finetune"),
    prepare=_later("stages", "prepare_finetune"), training_files=("model.pt", "lpr.json"),
    description="denoised smoothing, stage 2: fine-tune the denoiser through the query-only classifier"))

CERTIFY = register_task(Task(
    name="defense-certify", settings=CertifySettings, trainings=lambda s: s.names(),
    build=_later("stages", "certify_pipeline"), evaluate=_later("stages", "evaluate_certify"),
    prepare=_later("stages", "prepare_certify"), training_files=("certify.tsv", "predict.tsv"),
    description="Cohen et al.'s CERTIFY of the smoothed classifier f(D(x + delta)) for each denoiser"))
