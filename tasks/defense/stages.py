"""The defense stages as the run lifecycle sees them: each stage's prepare (load and check everything first),
build and evaluate, and the CERTIFY loop over a pipeline's planned images.

:mod:`bbzo.tasks.defense` declares the tasks with these functions, imported when a stage runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from bbzo import parallel
from bbzo.checkpoint import CHECKPOINT_NAME, atomic_write_bytes
from bbzo.config import as_plain
from bbzo.errors import BbzoError, ConfigError
from bbzo.run import BuildContext, Run

from .certify import ABSTAIN, certified_accuracy, certify_images, max_radius, predicted_accuracy
from .classmap import check_classes, resolve_class_map
from .data import ImageData, iter_rows, open_images
from .denoisers import describe, frozen, sha256, spec_of
from .methods import finetuned_denoiser, load_denoiser, make_denoiser, make_oracle, stability_targets
from .records import RowLog
from .report import certified_table, finetune_table, plot_certified, predicted_table
from .settings import CertifySettings, DefenseBase, FinetuneSettings, PretrainSettings

CERTIFY_FORMAT = "bbzo-certify/1"


# ---------------------------------------------------------------------------------------------- checks
def _probe(fn: Any, shape: tuple[int, ...], device: Any) -> torch.Tensor:
    with torch.no_grad():
        return fn(torch.zeros((1, *shape), device=device))


def check_setup(s: DefenseBase, run: Optional[Run], *, splits: tuple[str, ...], classifier: bool,
                denoisers: dict[str, Any]) -> dict[str, Any]:
    """Load and check everything a command was given, before any image is read.

    The classifier loads (``classifier``), every denoiser loads and maps an image of the data's shape to an
    image of that shape, and the classifier's output count matches the data's class count (or the class map
    covers the data's classes with the classifier's outputs). The data's class list is recorded in
    ``OUT/data.json``. Returns ``{data, net, class_map, denoisers, check_queries}``.
    """
    for what, dev in (("--device", s.device), ("--noise-device", getattr(s, "noise_device", "") or "cpu")):
        try:
            kind = torch.device(dev).type
        except RuntimeError:
            raise ConfigError(f"{what} {dev!r} is not a device; use cpu, cuda or cuda:N.") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"{what} {dev}, but torch sees no CUDA device here; use --device cpu (or check "
                              "CUDA_VISIBLE_DEVICES and the torch build).")
    net = None
    if classifier:
        from bbzo.oracles.classifier import load_classifier
        net = load_classifier(s.classifier, s.weights, s.num_classes)
    loaded = {name: src if isinstance(src, torch.nn.Module) else load_denoiser(s, src) for name, src in denoisers.items()}
    data = open_images(s.data, splits=splits, subset=getattr(s, "subset", 0) if "train" in splits else 0,
                       test_subset=s.test_subset, seed=s.seed, image_size=s.image_size, crop_pct=s.crop_pct)
    shape = data.image_shape()
    for name, den in loaded.items():
        try:
            out = _probe(den.eval() if isinstance(den, torch.nn.Module) else den, shape, s.device)
        except Exception as e:  # noqa: BLE001 - the user's module on the data's images
            raise ConfigError(f"denoiser {name} ({describe(spec_of(den))}) fails on an image of the data's shape "
                              f"{(1, *shape)}: {type(e).__name__}: {e}") from e
        if tuple(out.shape) != (1, *shape):
            raise ConfigError(f"denoiser {name} ({describe(spec_of(den))}) maps images {(1, *shape)} to "
                              f"{tuple(out.shape)}; a denoiser returns images of its input's shape.")
    class_map = resolve_class_map(s.class_map, data.classes, data.class_names) if s.class_map else None
    check_queries = 0
    if net is not None:
        probe = make_oracle(s, name="classifier-check", net=net)
        outputs = int(probe.query(torch.zeros((1, *shape), device=s.device)).shape[1])
        check_queries = probe.rows_used
        check_classes(outputs, data.num_classes, class_map, classifier=s.classifier, data=str(s.data))
    if run is not None and parallel.is_writer():
        info = {**data.describe(), **({"class_map": s.class_map, "classifier_outputs": class_map} if class_map else {})}
        (run.folder / "data.json").write_text(json.dumps(info, indent=1) + "\n")
    return {"data": data, "net": net, "class_map": class_map, "denoisers": loaded, "check_queries": check_queries}


# ---------------------------------------------------------------------------------------------- pretrain
def prepare_pretrain(s: PretrainSettings, run: Run) -> dict[str, Any]:
    make_denoiser(s)  # the architecture builds (a wrong --denoiser-arch fails here, before the data is read)
    return check_setup(s, run, splits=("train", "test"), classifier=False, denoisers={})


def evaluate_pretrain(s: PretrainSettings, run: Run, summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    t = summaries[""]
    row = {"steps": t.get("steps"), "epochs": t.get("epochs"), "wall_s": t.get("wall_s"), "setup_s": t.get("setup_s"),
           "train_s": t.get("train_s"), "train_s_per_epoch": t.get("train_s_per_epoch"),
           "test_psnr_before": t.get("eval_initial", {}).get("test_psnr"),
           "test_psnr": t.get("eval_final", {}).get("test_psnr")}
    label = describe(t.get("denoiser"))
    data: ImageData = run.shared["data"]
    table = ("| denoiser | sigma | steps | epochs | training [s] | s/epoch | test PSNR before [dB] | after [dB] |\n"
             "|---|---|---|---|---|---|---|---|\n"
             f"| {label} | {s.sigma} | {row['steps']} | {row['epochs']} | {row['train_s']} | {row['train_s_per_epoch']} | "
             f"{row['test_psnr_before']} | {row['test_psnr']} |\n\n"
             f"First-order (autograd, Adam); the classifier is not used, so no queries. PSNR: D(x + delta) against x "
             f"on {int(data.test_rows.numel()):,} test images, one noise draw each; training [s] counts the steps alone "
             f"(set-up {row['setup_s']} s). The denoiser: --denoiser {run.folder / 'model.pt'}")
    return {"config": as_plain(s), "results": row, "weights": str(run.folder / "model.pt"), "denoiser": t.get("denoiser"),
            "data": run.shared["data"].describe(), "table": table}



# ---------------------------------------------------------------------------------------------- finetune
def prepare_finetune(s: FinetuneSettings, run: Run) -> dict[str, Any]:
    den = finetuned_denoiser(s)  # the denoiser (or the adapter and its frozen base) loads before the data is read
    shared = check_setup(s, run, splits=("train", "test"), classifier=True, denoisers={"denoiser": den})
    data: ImageData = shared["data"]
    labeler = make_oracle(s, name="classifier-labels", net=shared["net"], classes=shared["class_map"])
    assert data.train is not None and data.train_rows is not None
    targets = stability_targets(labeler, data.train, s.device, s.max_batch, rows=data.train_rows,
                                workers=s.loader_workers, progress=run.progress)
    labels = data.train.labels[data.train_rows]
    return {**shared, "targets": targets, "label_queries": labeler.rows_used,
            "label_agreement": round(100.0 * float((targets == labels).float().mean()), 2)}


def evaluate_finetune(s: FinetuneSettings, run: Run, summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rows = []
    for name, t in summaries.items():
        if t.get("status") != "done":
            continue
        rows.append({"method": name, "queries_per_step": t["queries_per_step"], "steps": t["steps"],
                     "queries": t["queries"], "classifier_images": t.get("oracle_rows", 0), "wall_s": t["wall_s"],
                     "setup_s": t.get("setup_s"), "train_s": t.get("train_s"), "zeroth_order": t["zeroth_order"],
                     "noisy_acc_before": t["eval_initial"]["noisy_acc"], "noisy_acc": t["eval_final"]["noisy_acc"],
                     "final_train_loss": t.get("final_train_loss"), "score_queries": t.get("score_queries", 0),
                     "tuned": t.get("tuned"), "denoiser": describe(t.get("denoiser")),
                     "weights": str(run.training_folder(name) / "model.pt")})
    shared = run.shared
    data: ImageData = shared["data"]
    notes = (f"\n\nLabel queries: {shared['label_queries']:,} classifier images (argmax f(x) of each clean training "
             f"image, once, before training; f agrees with the true label on {shared['label_agreement']}% of them), "
             f"plus {shared['check_queries']} to check the classifier. Noisy acc: top-1 of f(D(x + delta)), one noise "
             f"draw per test image, on {int(data.test_rows.numel()):,} test images (evaluations are not charged). "
             "Training [s] counts the steps alone; set-up includes ZO-GraSP's score.")
    return {"config": as_plain(s), "label_queries": shared["label_queries"], "check_queries": shared["check_queries"],
            "classifier_train_agreement": shared["label_agreement"], "data": data.describe(),
            "results": rows, "table": finetune_table(rows) + notes}



# ---------------------------------------------------------------------------------------------- certify
def pipeline(denoiser: Any, oracle: Any):
    """``noisy images -> logits`` of ``f(D(.))`` (``denoiser`` None: the classifier alone)."""
    def run(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return oracle.query(denoiser(z) if denoiser is not None else z)
    return run


def _digest(source: Any) -> Optional[str]:
    path = Path(str(source)) if source is not None else None
    return sha256(path) if path is not None and path.is_file() else None


def prepare_certify(s: CertifySettings, run: Run) -> dict[str, Any]:
    if parallel.world_size() > 1:
        raise ConfigError("bbzo defense certify runs in one process (each image is certified by batches of noise "
                          "samples on one device); drop --workers.")
    names = s.names()
    chosen = {n: s.denoisers[n] for n in names if n != "none"}
    shared = check_setup(s, run, splits=("test",), classifier=True, denoisers=chosen)
    data: ImageData = shared["data"]
    rows = data.test_rows[::s.skip]
    plan = [(int(k) * s.skip, int(i)) for k, i in enumerate(rows.tolist())]  # (noise key, dataset index)
    noise = torch.device(s.noise_device or s.device)
    identity = {"classifier": str(s.classifier), "classifier_sha256": _digest(s.classifier) or _digest(s.weights),
                "noise_device": noise.type,
                "noise_gpu": torch.cuda.get_device_name(noise) if noise.type == "cuda" else None}
    return {**shared, "plan": plan, "identity": identity, "rows": {}, "queries": {}, "resumed": {},
            "sources": {n: {"source": str(src), "sha256": _digest(src), "denoiser": spec_of(shared["denoisers"][n])}
                        for n, src in chosen.items()}}


def _check_resume(path: Path, mine: dict[str, Any]) -> None:
    """A resumed pipeline must certify the same images with the same models and the same noise device."""
    try:
        old = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{path} is unreadable ({type(e).__name__}); use --overwrite to certify again.") from e
    if not isinstance(old, dict) or old.get("format") != CERTIFY_FORMAT:
        raise ConfigError(f"{path} is not a bbzo certification record; use --overwrite or another --out.")
    for key in ("mode", "keys", "idx", "classifier", "classifier_sha256", "denoiser_sha256", "noise_device"):
        if old.get(key) != mine.get(key):
            what = {"keys": "the images", "idx": "the images", "classifier_sha256": "the classifier's weights file",
                    "denoiser_sha256": "the denoiser file", "noise_device": "the noise device"}.get(key, key)
            hint = (f" Resume with --noise-device {old.get(key)} (the noise must come from the same generator)."
                    if key == "noise_device" else " Use --overwrite to certify again, or another --out.")
            raise ConfigError(f"--resume: {what} changed since {path.parent.name} started ({old.get(key)!r} -> "
                              f"{mine.get(key)!r}).{hint}")
    if old.get("noise_gpu") != mine.get("noise_gpu"):
        print(f"[certify] note: {path.parent.name}'s noise was drawn on {old.get('noise_gpu')} and continues on "
              f"{mine.get('noise_gpu')}; CUDA noise streams differ between GPU models, so the rows after the resume "
              "are valid certificates but not the numbers an uninterrupted run would give.", file=sys.stderr)


def certify_pipeline(s: CertifySettings, name: str, ctx: BuildContext) -> None:
    """CERTIFY (or PREDICT) every planned image through one pipeline, appending each row to its table."""
    shared = ctx.shared
    if not parallel.is_writer():
        return None
    data: ImageData = shared["data"]
    mode = "predict" if s.predict else "certify"
    plan = shared["plan"]
    src = shared["sources"].get(name, {})
    record = {"format": CERTIFY_FORMAT, "pipeline": name, "mode": mode, "keys": [k for k, _ in plan],
              "idx": [i for _, i in plan], **shared["identity"], "denoiser_source": src.get("source"),
              "denoiser_sha256": src.get("sha256"), "denoiser": src.get("denoiser")}
    ck = ctx.folder / CHECKPOINT_NAME
    if ctx.resuming:
        _check_resume(ck, record)
    else:
        atomic_write_bytes(ck, lambda f: torch.save(record, f))
    log = RowLog(ctx.folder / f"{mode}.tsv", mode, record["idx"], resume=ctx.resuming)
    den = None if name == "none" else frozen(shared["denoisers"][name])
    oracle = make_oracle(s, name=f"classifier-{name}", net=shared["net"], classes=shared["class_map"])
    todo = plan[log.done:]
    bar = None
    if ctx.run.progress and todo:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(plan), initial=log.done, desc=f"{mode} {name}", unit="img")

    def images() -> Any:
        stream = iter_rows(data.test, torch.tensor([i for _, i in todo], dtype=torch.long), 1,
                           workers=s.loader_workers if todo else 0, device=s.device)
        for (key, idx), (x, y) in zip(todo, stream):
            yield key, idx, x[0], int(y[0])

    def on_row(row: dict[str, Any]) -> None:
        log.append(row)
        ctx.run.progressed = True  # a certified image is this stage's step: an interrupted run keeps its folder
        if bar is not None:
            bar.update(1)
    try:
        if todo:
            certify_images(pipeline(den, oracle), images(), sigma=s.sigma, n0=s.n0, n=s.n, alpha=s.alpha,
                           batch=s.batch, seed=s.seed, device=s.device, noise_device=s.noise_device or s.device,
                           mode=mode, on_row=on_row)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        print(f"\n[certify] interrupted: {log.done} of {len(plan)} images of {name} are saved in {log.path}; rerun "
              "the same command with --resume to continue from the next image.", file=sys.stderr)
        raise
    except BbzoError as e:  # the classifier or the denoiser failed: say what is kept
        saved = (f" {log.done} of {len(plan)} images of {name} are saved in {log.path}; fix the cause and rerun "
                 "with --resume to continue from the next image.")
        raise type(e)(f"{e}{saved}" if str(e).endswith(".") else f"{e}.{saved}") from e
    finally:
        if bar is not None:
            bar.close()
    per_image = s.n if mode == "predict" else s.n0 + s.n
    if oracle.rows_used != len(todo) * per_image:  # every image used exactly its samples
        raise RuntimeError(f"{name}: {oracle.rows_used} classifier rows for {len(todo)} images of {per_image} samples")
    shared["rows"][name] = log.rows
    shared["resumed"][name] = log.resumed
    shared["queries"][name] = len(log.rows) * per_image
    return None


def evaluate_certify(s: CertifySettings, run: Run, summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    shared = run.shared
    per_image: dict[str, list[dict[str, Any]]] = shared["rows"]
    count = len(shared["plan"])
    (run.folder / "per_image.json").write_text(json.dumps(per_image) + "\n")
    common = {"config": as_plain(s), "images": count, "classifier_queries": shared["queries"],
              "check_queries": shared["check_queries"], "resumed_rows": shared["resumed"],
              "data": shared["data"].describe(), "denoisers": shared["sources"],
              "noise": {"device": shared["identity"]["noise_device"], "gpu": shared["identity"]["noise_gpu"]},
              "abstain": {n: sum(1 for r in rs if r["predict"] == ABSTAIN) for n, rs in per_image.items()},
              "seconds_per_image": {n: round(sum(r["seconds"] for r in rs) / max(1, len(rs)), 4)
                                    for n, rs in per_image.items()}}
    if s.predict:
        tables = {n: predicted_accuracy(rs) for n, rs in per_image.items()}
        return {**common, "mode": "predict", "predicted_accuracy": tables,
                "table": predicted_table(tables, count) + _certify_notes(s, shared, count, None), "plots": []}
    tables = {n: certified_accuracy(rs, s.radii) for n, rs in per_image.items()}
    top = max_radius(s.sigma, s.n, s.alpha)
    plots = []
    if run.plots:
        p = plot_certified(run.folder / "certified_accuracy.png", per_image, s.sigma, max(top, max(s.radii)) * 1.05,
                           limit=top)
        plots = [str(p)] if p is not None else []
    return {**common, "mode": "certify", "certified_accuracy": tables, "max_certifiable_radius": round(top, 4),
            "table": certified_table(tables, count) + _certify_notes(s, shared, count, top), "plots": plots}


def _certify_notes(s: CertifySettings, shared: dict[str, Any], count: int, top: Optional[float]) -> str:
    """The counts a reader of the table needs: images, samples, classifier queries, abstentions, the radius limit."""
    per = s.n if s.predict else s.n0 + s.n
    queries = ", ".join(f"{n} {q:,}" for n, q in shared["queries"].items())
    abstain = ", ".join(f"{n} {sum(1 for r in rs if r['predict'] == ABSTAIN)}" for n, rs in shared["rows"].items())
    text = (f"\n\n{count:,} test images, sigma = {s.sigma}; {per:,} noise samples per image "
            + (f"(n0 = {s.n0} to pick the class, n = {s.n} to bound it, alpha = {s.alpha})" if not s.predict else
               f"(n = {s.n}, alpha = {s.alpha})")
            + f". Classifier queries (images): {queries}. Abstained: {abstain}.")
    if top is not None:
        text += (f" The largest radius n = {s.n:,} samples can certify is {top:.3f} (every sample correct); "
                 "radii above it are 0 by construction.")
    return text
