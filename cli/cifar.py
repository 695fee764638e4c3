"""``bbzo cifar``: CIFAR-10 from scratch with DeepZero and its FO / RGE / CGE baselines.

    bbzo cifar train --data ../shared/data/cifar10_subset.npz --model resnet20 --method deepzero --out runs/c10
    bbzo cifar train --preset fig2 --data cifar10_subset.npz --method cge --lr 1e-3 --out runs/fig2-cge
    bbzo cifar train --preset smoke --data cifar10_subset.npz --out runs/c10-smoke   # ~15 min, 2 CPU cores
    bbzo cifar eval runs/c10                                   # test accuracy and the per-class table

Settings come from a preset (``paper``: DeepZero's ResNet-20 recipe; ``smoke``; ``fig2``), then a
``--config`` file (flat keys, as the flags), then flags; all of them are declared once in
:class:`bbzo.tasks.cifar.CifarSettings`. ``--workers M`` shares every step's queries among M processes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import click

from bbzo.errors import ConfigError
from bbzo.tasks.cifar import TASK

from .tasks import task_command


@click.group("cifar")
def cifar() -> None:
    """CIFAR-10 from scratch: DeepZero (Sparse-CGE at ZO-GraSP ratios) and FO / RGE / CGE (DeepZero §6.1)."""


cifar.add_command(task_command(
    TASK, "train", help="Train each --method into OUT/METHOD; then the results table and curves.png (loss, test accuracy)."))


@cifar.command("eval")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), help="Dataset (default: the one the run was trained on).")
@click.option("--test-subset", type=int, help="Class-balanced test subset (default: the run's; 0: all).")
@click.option("--device", help="cpu, cuda, ... (default: the run's).")
def eval_cmd(run: Path, data: Optional[Path], test_subset: Optional[int], device: Optional[str]) -> None:
    """Test accuracy and the per-class accuracy table of every method trained in RUN (eval.json, eval.md)."""
    import torch

    from bbzo.checkpoint import atomic_write_bytes
    from bbzo.jsonio import dumps
    from bbzo.run import Run
    from bbzo.tasks.cifar import accuracy, load_data, make_model, per_class_table

    s = Run.settings_of(run, TASK)
    changes: dict[str, Any] = {k: v for k, v in (("data", data), ("test_subset", test_subset), ("device", device))
                               if v is not None}
    s = dataclasses.replace(s, **changes)
    d = load_data(s.data, 0, s.test_subset, s.seed)  # the test split only matters here
    evals: dict[str, dict[str, Any]] = {}
    for m in s.method:
        path = run / m / "model.pt"
        if not path.exists():
            click.echo(f"skip {m}: {path} does not exist (not trained, or still training).", err=True)
            continue
        model = make_model(s, d)
        try:
            model.load_state_dict(torch.load(path, map_location=s.device, weights_only=True))
        except Exception as e:  # noqa: BLE001 - a corrupt or foreign file
            raise ConfigError(f"{path} is not a {s.model} state dict ({type(e).__name__}: {str(e)[:200]}); "
                              "retrain that method.") from e
        evals[m] = accuracy(model, d.test_x, d.test_y, d.num_classes, progress=True)
    if not evals:
        raise ConfigError(f"{run} holds no trained model (OUT/METHOD/model.pt); train with `bbzo cifar train` first.")
    table = per_class_table(evals, d.classes)
    out = {"run": str(run), "model": s.model, "data": d.source, "test_images": int(d.test_x.shape[0]),
           "classes": list(d.classes), "methods": evals}
    text = dumps(out, indent=1) + "\n"
    atomic_write_bytes(run / "eval.json", lambda f: f.write(text.encode()))
    (run / "eval.md").write_text(table + "\n")
    click.echo("\n" + table)
    click.echo(f"\nresults: {run / 'eval.json'}")
