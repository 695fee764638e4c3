"""``bbzo defense``: the certified black-box defense (denoised smoothing with a query-only classifier).

    bbzo defense pretrain --data imagenette2/ --depth 17 --width 64 --device cuda --out runs/def/pretrain
    bbzo defense finetune --data imagenette2/ --classifier resnet50 --weights rn50_in1k.pt --num-classes 1000 \\
        --class-map imagenette --denoiser runs/def/pretrain/model.pt --method zo,fo --device cuda --out runs/def/finetune
    bbzo defense certify --data imagenette2/ --classifier resnet50 --weights rn50_in1k.pt --num-classes 1000 \\
        --class-map imagenette --denoisers '{mse: runs/def/pretrain/model.pt, zo: runs/def/finetune/zo/model.pt}' \\
        --device cuda --out runs/def/cert          # Ctrl-C, then the same command with --resume, continues

``--data`` is an ImageFolder root (``train/<class>/*.JPEG``, ``val/<class>/*.JPEG``) or an ``.npz``; the
denoiser files record their architecture, so only ``pretrain`` names it.

The classifier is only ever queried (``fo`` -- FO-DS -- is the white-box reference and says so). Settings
come from flags, ``--config`` (flat keys) and are declared in :mod:`bbzo.tasks.defense.settings`;
``--workers M`` shares every step's queries among M processes.
"""

from __future__ import annotations

import click

from bbzo.tasks.defense import CERTIFY, FINETUNE, PRETRAIN

from .tasks import task_command


@click.group("defense")
def defense() -> None:
    """Certified black-box defense: DnCNN denoiser + query-only classifier, Cohen et al.'s CERTIFY (DeepZero §6.2)."""


defense.add_command(task_command(PRETRAIN, "pretrain", help=(
    "Stage 1: pretrain a DnCNN on MSE(D(x + delta), x) with Adam (first-order; the classifier is not used).")))
defense.add_command(task_command(FINETUNE, "finetune", help=(
    "Stage 2: fine-tune the denoiser on CE(f(D(x + delta)), argmax f(x)) with f only queried: zo (DeepZero), "
    "zo-ds (chain-rule RGE); fo is FO-DS, the white-box reference.")))
defense.add_command(task_command(CERTIFY, "certify", help=(
    "CERTIFY f(D(x + delta)) for no denoiser and each --denoisers entry: per-image tables, the certified-accuracy "
    "table at --radii, certified_accuracy.png.")))
