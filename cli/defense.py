"""``bbzo defense``: the certified black-box defense (denoised smoothing with a query-only classifier).

On a laptop (``--preset small``: minutes per stage on 2 CPU cores; docs/results/defense.md has the numbers)::

    D=../shared/data/imagenette_32px.npz
    bbzo defense classifier --preset small --data $D --out runs/def/clf          # the black box (first-order)
    bbzo defense pretrain --preset small --data $D --out runs/def/pre
    bbzo defense finetune --preset small --data $D --weights runs/def/clf/model.pt \
        --denoiser runs/def/pre/model.pt --out runs/def/ft
    bbzo defense certify --preset small --data $D --weights runs/def/clf/model.pt \
        --denoisers '{mse: runs/def/pre/model.pt, zo: runs/def/ft/zo/model.pt}' --out runs/def/cert

At the paper's scale, on a GPU:

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

from bbzo.tasks.defense import CERTIFY, CLASSIFIER, FINETUNE, PRETRAIN

from .tasks import task_command


class _Stages(click.Group):
    """The stages in the order a user runs them (not alphabetical)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


@click.group("defense", cls=_Stages)
def defense() -> None:
    """Certified black-box defense: DnCNN denoiser + query-only classifier, Cohen et al.'s CERTIFY (DeepZero §6.2).

    \b
    On a laptop (--preset small, minutes per stage on 2 CPU cores; docs/results/defense.md):
    bbzo defense classifier --preset small --data imagenette_32px.npz --out runs/def/clf
    bbzo defense pretrain --preset small --data imagenette_32px.npz --out runs/def/pre
    bbzo defense finetune --preset small --data imagenette_32px.npz --weights runs/def/clf/model.pt --denoiser runs/def/pre/model.pt --out runs/def/ft
    bbzo defense certify --preset small --data imagenette_32px.npz --weights runs/def/clf/model.pt --denoisers '{mse: runs/def/pre/model.pt, zo: runs/def/ft/zo/model.pt}' --out runs/def/cert
    """


defense.add_command(task_command(CLASSIFIER, "classifier", help=(
    "Stage 0: train the classifier that plays the black box on the clean images (its owner's first-order training); "
    "OUT/model.pt is the --weights of the other stages.")))
defense.add_command(task_command(PRETRAIN, "pretrain", help=(
    "Stage 1: pretrain a DnCNN on MSE(D(x + delta), x) with Adam (first-order; the classifier is not used).")))
defense.add_command(task_command(FINETUNE, "finetune", help=(
    "Stage 2: fine-tune the denoiser on CE(f(D(x + delta)), argmax f(x)) with f only queried: zo (DeepZero), "
    "zo-ds (chain-rule RGE); fo is FO-DS, the white-box reference.")))
defense.add_command(task_command(CERTIFY, "certify", help=(
    "CERTIFY f(D(x + delta)) for no denoiser and each --denoisers entry: per-image tables, the certified-accuracy "
    "table at --radii, certified_accuracy.png.")))
