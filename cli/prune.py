"""``bbzo prune``: layer-wise pruning ratios (LPR) from a pruning score, saved as readable JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from bbzo.config import config_option


def _parse_options(items: tuple[str, ...]) -> dict:
    out: dict = {}
    for it in items:
        if "=" not in it:
            raise click.BadParameter(f"{it!r}: use KEY=VALUE, e.g. --option q=192", param_hint="--option")
        k, v = it.split("=", 1)
        for cast in (int, float):
            try:
                out[k] = cast(v)
                break
            except ValueError:
                continue
        else:
            out[k] = {"true": True, "false": False}.get(v.lower(), v)
    return out


def _accepted(model_name: str, **kw: object) -> dict:
    """The keyword arguments the registered model builder accepts."""
    import inspect

    from bbzo.models.registry import _MODELS

    fn = _MODELS.get(model_name, (None,))[0]
    if fn is None:
        return {}
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kw.items() if k in params}


@click.command("prune")
@config_option
@click.option("--model", "model_name", default="resnet20", show_default=True,
              help="Model to score: a registered name (see `bbzo models`) or a builder reference "
                   "'pkg.mod:fn' / 'path/file.py:fn' returning an nn.Module.")
@click.option("--score", default="zo_grasp", show_default=True,
              help="Pruning score (see `bbzo prune --list`): zo_grasp, zo_grasp_oracle, zo_grasp_sketch, "
                   "fo_grasp, snip, magnitude, random, layer_noise.")
@click.option("--sparsity", type=float, default=0.9, show_default=True,
              help="Global fraction of scored coordinates NOT kept, in [0, 1).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("lpr.json"), show_default=True,
              help="Where to write the LPR JSON.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Scoring images: .npz (train_x/train_y, ...) or a cifar-10-batches-py folder. "
                   "Needed by data-dependent scores.")
@click.option("--per-class", type=int, default=25, show_default=True,
              help="Scoring batch: this many training images per class (DeepZero: 25 -> 250 images).")
@click.option("--seed", type=int, default=0, show_default=True, help="Model init and score seed.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Score option, repeatable (e.g. --option q=192 --option mu=5e-3).")
@click.option("--include", multiple=True, metavar="GLOB",
              help="Score these parameters instead of all Conv/Linear weights (repeatable).")
@click.option("--num-classes", type=int, default=10, show_default=True, help="Classifier outputs.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--list", "list_only", is_flag=True, help="List the registered scores and exit.")
def prune(config: Optional[str], model_name: str, score: str, sparsity: float, out: Path, data: Optional[Path], per_class: int,
          seed: int, options: tuple[str, ...], include: tuple[str, ...], num_classes: int, device: str,
          list_only: bool) -> None:
    """Score MODEL at initialization and write its layer-wise kept fractions at SPARSITY.

    The loss is the mean cross-entropy of the model (train-mode BN) on a class-balanced batch, the
    DeepZero protocol. The LPR feeds `bbzo train --lpr lpr.json --resample-every N` (Sparse-CGE).
    """
    import torch
    import torch.nn.functional as F

    from bbzo.models import create_model
    from bbzo.sparsity import compute_score, list_scores, ratios_from_scores

    if list_only:
        for info in list_scores(with_info=True):
            kind = "query-only" if info.query_only else "white-box"
            click.echo(f"{info.name:<16} {kind:<10} queries: {info.cost:<40} {info.description}")
        return
    infos = {i.name: i for i in list_scores(with_info=True)}
    if score not in infos:
        raise click.BadParameter(f"unknown score {score!r}; choose from {', '.join(sorted(infos))}.",
                                 param_hint="--score")
    torch.manual_seed(seed)
    if ":" in model_name:  # a user's builder, e.g. mypkg.net:build or path/to/net.py:build
        from bbzo.reference import load_object

        model = load_object(model_name)()
    else:
        model = create_model(model_name, **_accepted(model_name, num_classes=num_classes))
    model = model.to(device).train()
    x = y = None
    if infos[score].needs_data:
        if data is None:
            raise click.UsageError(f"score {score!r} needs scoring images: pass --data path/to/cifar10.npz "
                                   "(or use a data-free score: magnitude, random, layer_noise).")
        from bbzo.tasks.cifar import class_balanced_subset, load_image_classification

        xs, ys = load_image_classification(data, "train")
        idx = class_balanced_subset(ys, per_class)
        x, y = xs[idx].to(device), ys[idx].to(device)

    def ce(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(o, t, reduction="none")

    res = compute_score(score, model, ce, x, y, include=list(include) or None, seed=seed, **_parse_options(options))
    lpr = ratios_from_scores(res.scores, sparsity, res.keep, model=model_name, score=score, seed=seed,
                             queries=res.queries, extra={**{k: str(v) for k, v in res.info.items()},
                                                         "seconds": round(res.seconds, 2),
                                                         "scoring_images": 0 if x is None else int(x.shape[0])})
    lpr.save(out)
    click.echo(f"{score}: {res.queries} queries, {res.seconds:.1f} s; kept {lpr.total_kept:,} of "
               f"{lpr.total_size:,} ({1 - lpr.total_kept / lpr.total_size:.1%} sparse)")
    click.echo("| layer | size | kept | kept fraction |\n|---|---:|---:|---:|")
    for n, f in lpr.kept_fraction.items():
        click.echo(f"| {n} | {lpr.size[n]:,} | {lpr.kept[n]:,} | {f:.3f} |")
    click.echo(f"\nwrote {out}")
