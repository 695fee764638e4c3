"""Certified black-box defense (DeepZero §6.2, App. G): a DnCNN in front of a query-only classifier, then CERTIFY.

* :mod:`.data` -- the images and noisy minibatches as a function of (seed, step);
* :mod:`.settings` -- the settings of ``pretrain`` / ``finetune`` / ``certify``;
* :mod:`.methods` -- MSE pretraining and the fine-tunings zo (DeepZero), fo (FO-DS, white-box), zo-ds;
* :mod:`.certify` -- Cohen et al.'s CERTIFY / PREDICT with exact Clopper-Pearson bounds (scipy);
* :mod:`.report` -- the certified-accuracy table beside the paper's and its plot.

The black box is :class:`bbzo.oracles.classifier.ClassifierOracle`; ``bbzo defense ...`` is the command line.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from bbzo.config import as_plain
from bbzo.run import Run
from bbzo.task import Task, register_task

from .certify import (ABSTAIN, RADII, accuracy_interval, certified_accuracy, certify, certify_dataset,
                      lower_confidence_bound, max_radius, predict, sample_counts)
from .data import NoisyBatches, load_images
from .methods import (budget_ratios, build_finetune, build_pretrain, load_denoiser, make_denoiser, make_oracle,
                      noisy_accuracy, psnr, stability_targets)
from .report import PAPER_TABLE2, certified_table, finetune_table, plot_certified
from .settings import METHOD_NAMES, METHODS, CertifySettings, DefenseBase, FinetuneSettings, PretrainSettings

__all__ = ["PRETRAIN", "FINETUNE", "CERTIFY", "CertifySettings", "FinetuneSettings", "PretrainSettings",
           "DefenseBase", "METHODS", "METHOD_NAMES", "NoisyBatches", "load_images", "certify", "predict",
           "certify_dataset", "certified_accuracy", "lower_confidence_bound", "max_radius", "sample_counts",
           "accuracy_interval", "ABSTAIN", "RADII", "make_oracle", "make_denoiser", "load_denoiser",
           "stability_targets", "noisy_accuracy", "psnr", "budget_ratios", "certified_table", "finetune_table",
           "plot_certified", "PAPER_TABLE2", "pipeline"]


# ---------------------------------------------------------------------------------------------- pretrain
def _prepare_images(s: DefenseBase, run: Run) -> Any:
    return load_images(s.data, s.subset, s.test_subset, s.seed)


def _evaluate_pretrain(s: PretrainSettings, run: Run, summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    t = summaries[""]
    row = {"steps": t.get("steps"), "epochs": t.get("epochs"), "wall_s": t.get("wall_s"),
           "test_psnr_before": t.get("eval_initial", {}).get("test_psnr"),
           "test_psnr": t.get("eval_final", {}).get("test_psnr")}
    table = ("| denoiser | sigma | steps | wall [s] | test PSNR before [dB] | after [dB] |\n|---|---|---|---|---|---|\n"
             f"| DnCNN {s.depth}x{s.width} | {s.sigma} | {row['steps']} | {row['wall_s']} | "
             f"{row['test_psnr_before']} | {row['test_psnr']} |")
    return {"config": as_plain(s), "results": row, "weights": str(run.folder / "model.pt"), "table": table}


PRETRAIN = register_task(Task(
    name="defense-pretrain", settings=PretrainSettings, trainings=lambda s: [""], build=build_pretrain,
    evaluate=_evaluate_pretrain, prepare=_prepare_images, training_files=("model.pt",),
    description="denoised smoothing, stage 1: pretrain a DnCNN denoiser on MSE(D(x + delta), x) (first-order)"))


# ---------------------------------------------------------------------------------------------- finetune
def _prepare_finetune(s: FinetuneSettings, run: Run) -> dict[str, Any]:
    from bbzo.oracles.classifier import load_classifier

    data = load_images(s.data, s.subset, s.test_subset, s.seed)
    net = load_classifier(s.classifier, s.weights, s.num_classes)
    labeler = make_oracle(s, name="classifier-labels", net=net)
    targets = stability_targets(labeler, data.train_x, s.device, s.max_batch)
    return {"data": data, "net": net, "targets": targets, "label_queries": labeler.rows_used,
            "label_agreement": round(100.0 * float((targets == data.train_y).float().mean()), 2)}


def _evaluate_finetune(s: FinetuneSettings, run: Run, summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rows = []
    for name, t in summaries.items():
        if t.get("status") != "done":
            continue
        rows.append({"method": name, "queries_per_step": t["queries_per_step"], "steps": t["steps"],
                     "queries": t["queries"], "wall_s": t["wall_s"], "zeroth_order": t["zeroth_order"],
                     "noisy_acc_before": t["eval_initial"]["noisy_acc"], "noisy_acc": t["eval_final"]["noisy_acc"],
                     "final_train_loss": t.get("final_train_loss"), "score_queries": t.get("score_queries", 0),
                     "weights": str(run.training_folder(name) / "model.pt")})
    shared = run.shared
    return {"config": as_plain(s), "label_queries": shared["label_queries"],
            "classifier_train_agreement": shared["label_agreement"], "results": rows, "table": finetune_table(rows)}


FINETUNE = register_task(Task(
    name="defense", settings=FinetuneSettings, trainings=lambda s: s.method, build=build_finetune,
    evaluate=_evaluate_finetune, prepare=_prepare_finetune, training_files=("model.pt", "lpr.json"),
    description="denoised smoothing, stage 2: fine-tune the denoiser through the query-only classifier"))


# ---------------------------------------------------------------------------------------------- certify
def pipeline(denoiser: Any, oracle: Any):
    """``noisy images -> logits`` of ``f(D(.))`` (``denoiser`` None: the classifier alone)."""
    def run(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return oracle.query(denoiser(z) if denoiser is not None else z)
    return run


def _prepare_certify(s: CertifySettings, run: Run) -> dict[str, Any]:
    from bbzo.oracles.classifier import load_classifier

    data = load_images(s.data, 0, s.test_subset, s.seed)
    return {"data": data, "net": load_classifier(s.classifier, s.weights, s.num_classes)}


def _evaluate_certify(s: CertifySettings, run: Run, summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    shared = run.shared
    data = shared["data"]
    idx = list(range(0, data.test_x.shape[0], s.skip))
    per_image: dict[str, list[dict[str, Any]]] = {}
    tables: dict[str, dict[str, float]] = {}
    queries: dict[str, int] = {}
    for name in ["none", *s.denoisers]:
        den = None if name == "none" else load_denoiser(s, s.denoisers[name]).eval()
        oracle = make_oracle(s, name=f"classifier-{name}", net=shared["net"])
        bar = None
        if run.progress:
            from tqdm.auto import tqdm
            bar = lambda it, name=name: tqdm(it, desc=f"certify {name}", unit="img")  # noqa: E731
        rows = certify_dataset(pipeline(den, oracle), data.test_x, data.test_y, sigma=s.sigma, n0=s.n0, n=s.n,
                               alpha=s.alpha, batch=s.batch, seed=s.seed, indices=idx, progress=bar, device=s.device)
        folder = run.folder / name
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["idx\tlabel\tpredict\tradius\tcorrect\tseconds"] + [
            f"{r['idx']}\t{r['label']}\t{r['predict']}\t{r['radius']:.4f}\t{r['correct']}\t{r['seconds']:.3f}" for r in rows]
        (folder / "certify.tsv").write_text("\n".join(lines) + "\n")
        per_image[name] = rows
        tables[name] = certified_accuracy(rows, s.radii)
        queries[name] = oracle.rows_used
    top = max_radius(s.sigma, s.n, s.alpha)
    plots = []
    if run.plots:
        p = plot_certified(run.folder / "certified_accuracy.png", per_image, s.sigma, max(top, max(s.radii)) * 1.05, limit=top)
        plots = [str(p)] if p is not None else []
    (run.folder / "per_image.json").write_text(json.dumps(per_image) + "\n")
    return {"config": as_plain(s), "certified_accuracy": tables, "images": len(idx),
            "max_certifiable_radius": round(top, 4), "classifier_queries": queries,
            "abstain": {n: sum(1 for r in rs if r["predict"] == ABSTAIN) for n, rs in per_image.items()},
            "seconds_per_image": {n: round(sum(r["seconds"] for r in rs) / len(rs), 4) for n, rs in per_image.items()},
            "table": certified_table(tables, len(idx)), "plots": plots}


CERTIFY = register_task(Task(
    name="defense-certify", settings=CertifySettings, trainings=lambda s: ["none", *s.denoisers],
    build=lambda s, name, ctx: None, evaluate=_evaluate_certify, prepare=_prepare_certify,
    description="Cohen et al.'s CERTIFY of the smoothed classifier f(D(x + delta)) for each denoiser"))
