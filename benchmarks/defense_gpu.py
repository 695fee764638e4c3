"""The defense pipeline on a GPU: throughput, and the CUDA result checked against the CPU on the same images.

One short prepared script (about 4 minutes on one H100, at most 8) for a machine with CUDA. It generates a
small ImageFolder of JPEGs (10 classes, 256 x 320 px, decoded by DataLoader workers and cropped to 224 px
by Resize(256) + CenterCrop(224)), a ResNet-50 black box (random weights: this measures speed and agreement,
not accuracy) and runs the commands behind ``bbzo defense`` on ``--device``:

1. ``pretrain``: a DnCNN 17 x 64 on MSE for a few steps;
2. ``finetune --method zo``: DeepZero's step (ZO-GraSP, then Sparse-CGE on 1,152 of the last conv's 1,728
   weights), a few steps: seconds per step and classifier images per second;
3. ``certify``: CERTIFY for none / mse / zo (n0 = 100, n = 1,000): images certified per second per pipeline and
   pipeline samples per second; and the noise alone: noise draws per second on the device;
4. the check: the same images certified on the CPU and on the device with the CPU's noise
   (``--noise-device cpu``, TF32 off): the predictions must agree, and the counts nA within ``--tolerance``.

Prints the JSON (and writes ``--out``):

    python benchmarks/defense_gpu.py --device cuda --out benchmarks/results/defense_gpu_h100.json

``--device cpu`` runs the same script at smoke size (32 px, DnCNN 5 x 16, ResNet-18, n = 50; about two
minutes on 2 shared cores) to check the script itself; its "CPU check" then compares two CPU runs with
different batches, and the JSON says ``"ran_on_cuda": false``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bbzo.config import resolve  # noqa: E402
from bbzo.oracles.classifier import build_classifier  # noqa: E402
from bbzo.provenance import provenance  # noqa: E402
from bbzo.run import run_task  # noqa: E402
from bbzo.tasks.defense import CERTIFY, FINETUNE, PRETRAIN, CertifySettings, FinetuneSettings, PretrainSettings  # noqa: E402
from bbzo.tasks.defense.certify import NOISE_BLOCK, NoiseStream, image_generator  # noqa: E402
from common import emit  # noqa: E402

GPU = {"size": 224, "depth": 17, "width": 64, "classifier": "resnet50", "n0": 100, "n": 1000, "images": 10,
       "budget": 1152, "ft_batch": 8, "ft_steps": 3, "check_images": 2, "check_n0": 20, "check_n": 60, "batch": 550,
       "noise_blocks": 50}
SMOKE = {"size": 32, "depth": 5, "width": 16, "classifier": "resnet18", "n0": 10, "n": 50, "images": 4,
         "budget": 64, "ft_batch": 4, "ft_steps": 2, "check_images": 2, "check_n0": 10, "check_n": 30, "batch": 25,
         "noise_blocks": 20}


def make_folder(root: Path, classes: int = 10, train: int = 8, val: int = 4, seed: int = 0) -> Path:
    """``root/{train,val}/cNN/*.JPEG``: smooth random images, a class-specific colour and frequency, 256 x 320."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:320] / 256.0
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"c{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                phase = rng.uniform(0, 6.3, 3)
                img = np.stack([0.5 + 0.4 * np.sin(2 * np.pi * (1 + c % 4) * (xx + yy * (k - 1)) + phase[k])
                                for k in range(3)], -1)
                img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
                Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"{i:03d}.JPEG", quality=90)
    return root


def timed_stage(task: Any, cls: type, values: dict[str, Any]) -> tuple[dict[str, Any], float]:
    settings, sources = resolve(cls, {**values, "overwrite": True, "no_progress": True, "no_plots": True})
    sync(values.get("device", "cpu"))
    t0 = time.perf_counter()
    out = run_task(task, settings, sources, command="benchmarks/defense_gpu.py")
    sync(values.get("device", "cpu"))
    return out, time.perf_counter() - t0


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def noise_rate(device: str, shape: tuple[int, ...], blocks: int) -> dict[str, float]:
    """Noise samples (images' worth) drawn per second on ``device`` by the certification's stream."""
    stream = NoiseStream(shape, image_generator(0, 0, device))
    stream.take(NOISE_BLOCK)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(blocks):
        stream.take(NOISE_BLOCK)
    sync(device)
    dt = time.perf_counter() - t0
    per_s = blocks * NOISE_BLOCK / dt
    return {"noise_draws_per_s": round(per_s, 1), "noise_values_per_s": round(per_s * float(np.prod(shape)), 1)}


def rows(folder: Path, name: str) -> list[dict[str, float]]:
    lines = (folder / name / "certify.tsv").read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, map(float, line.split("\t")))) for line in lines[1:]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", type=Path, default=None, help="Working folder (default: a temporary one).")
    ap.add_argument("--tolerance", type=int, default=3, help="Largest |nA difference| CPU vs device in the check.")
    ap.add_argument("--loader-workers", type=int, default=4)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no CUDA device; run with --device cpu for the smoke check.")
    cfg = GPU if cuda else SMOKE
    t_all = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="bbzo_defense_gpu_"))
    data = make_folder(work / "folder")
    torch.manual_seed(0)
    weights = work / "classifier.pt"
    torch.save(build_classifier(cfg["classifier"], 10).state_dict(), weights)
    common = {"data": data, "classifier": cfg["classifier"], "weights": weights, "num_classes": 10,
              "image_size": cfg["size"], "depth": cfg["depth"], "width": cfg["width"], "seed": 0,
              "device": args.device, "loader_workers": args.loader_workers, "max_batch": 1024}
    wall: dict[str, float] = {}
    _, wall["pretrain"] = timed_stage(PRETRAIN, PretrainSettings, {**common, "steps": 4, "batch": 8, "lr": 1e-3,
                                                                   "out": work / "pre", "test_subset": 10})
    ft, wall["finetune"] = timed_stage(FINETUNE, FinetuneSettings, {
        **common, "denoiser": work / "pre" / "model.pt", "method": ("zo",), "steps": cfg["ft_steps"],
        "batch": cfg["ft_batch"], "budget": cfg["budget"], "lr": 1e-3, "out": work / "ft", "test_subset": 10})
    zo = json.loads((work / "ft" / "zo" / "train.json").read_text())
    denoisers = {"mse": str(work / "pre" / "model.pt"), "zo": str(work / "ft" / "zo" / "model.pt")}
    skip = max(1, 40 // cfg["images"])
    cert, wall["certify"] = timed_stage(CERTIFY, CertifySettings, {
        **common, "denoisers": denoisers, "n0": cfg["n0"], "n": cfg["n"], "skip": skip, "batch": cfg["batch"],
        "out": work / "cert"})
    per_image = cert["seconds_per_image"]
    throughput = {
        "certify_images_per_s": {k: round(1.0 / v, 3) for k, v in per_image.items()},
        "certify_samples_per_s": {k: round((cfg["n0"] + cfg["n"]) / v, 1) for k, v in per_image.items()},
        "zo_step_s": round(zo["wall_s"] / max(1, zo["steps"]), 3),
        "zo_classifier_images_per_s": round(zo["ledger"]["oracles"]["classifier"]["rows"] / max(1e-9, zo["wall_s"]), 1),
        **noise_rate(args.device, (3, cfg["size"], cfg["size"]), cfg["noise_blocks"]),
    }

    # the check: the same images on the CPU, and on the device with the CPU's noise, TF32 off
    check = {**common, "denoisers": {"zo": denoisers["zo"]}, "pipelines": ("zo",), "n0": cfg["check_n0"],
             "n": cfg["check_n"], "skip": 40 // cfg["check_images"], "loader_workers": 0}
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        _, wall["check_device"] = timed_stage(CERTIFY, CertifySettings, {**check, "noise_device": "cpu",
                                                                         "batch": 16, "out": work / "check_dev"})
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    _, wall["check_cpu"] = timed_stage(CERTIFY, CertifySettings, {**check, "device": "cpu", "batch": 7,
                                                                  "out": work / "check_cpu"})
    dev, cpu = rows(work / "check_dev", "zo"), rows(work / "check_cpu", "zo")
    diffs = [abs(a["nA"] - b["nA"]) for a, b in zip(dev, cpu)]
    agree = {"images": len(cpu), "same_idx": [a["idx"] for a in dev] == [b["idx"] for b in cpu],
             "same_predictions": all(a["predict"] == b["predict"] for a, b in zip(dev, cpu)),
             "max_nA_difference": max(diffs) if diffs else None,
             "max_radius_difference": round(max(abs(a["radius"] - b["radius"]) for a, b in zip(dev, cpu)), 6),
             "n0": cfg["check_n0"], "n": cfg["check_n"], "tf32": False}
    agree["ok"] = bool(agree["same_idx"] and agree["same_predictions"] and max(diffs) <= args.tolerance)
    result = {
        "benchmark": "defense_gpu",
        "device": args.device,
        "gpu": torch.cuda.get_device_name(torch.device(args.device)) if cuda else None,
        "ran_on_cuda": cuda,
        "settings": {**cfg, "loader_workers": args.loader_workers, "tolerance": args.tolerance,
                     "images_certified": cert["images"], "image_folder": "10 classes, 8 train + 4 val each, 256 x 320 JPEG"},
        "throughput": throughput,
        "certified_accuracy_random_classifier": cert["certified_accuracy"],
        "zo": {"queries_per_step": zo["queries_per_step"], "steps": zo["steps"], "tuned": zo.get("tuned")},
        "cpu_check": agree,
        "wall_s": {**{k: round(v, 1) for k, v in wall.items()}, "total": round(time.perf_counter() - t_all, 1)},
        "seeds": {"data": 0, "classifier_init": 0, "run": 0},
        "command": " ".join(["python", *sys.argv]),
        **provenance(),
    }
    emit(result, args.out)
    if not agree["ok"]:
        sys.exit(f"error: the {args.device} certification disagrees with the CPU's: {agree}")


if __name__ == "__main__":
    main()
