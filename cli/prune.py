"""``bbzo prune``: layer-wise pruning ratios (LPR) from a pruning score, saved as readable JSON."""

from __future__ import annotations

from typing import Any, Optional

import click

from bbzo.sparsity import list_scores
from bbzo.tasks.prune import PruneSettings, prune_model

from .options import config_option, resolve_command, settings_options


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


@click.command("prune")
@config_option
@settings_options(PruneSettings)
@click.option("--option", "option_items", multiple=True, metavar="KEY=VALUE",
              help="Score option, repeatable (e.g. --option q=192 --option mu=5e-3).")
@click.option("--include", "include_globs", multiple=True, metavar="GLOB",
              help="Score these parameters instead of all Conv/Linear weights (repeatable).")
@click.option("--list", "list_only", is_flag=True, help="List the registered scores and exit.")
@click.pass_context
def prune(ctx: click.Context, config: Optional[str], option_items: tuple[str, ...], include_globs: tuple[str, ...],
          list_only: bool, **_: Any) -> None:
    """Score MODEL at initialization and write its layer-wise kept fractions at SPARSITY.

    The loss is the mean cross-entropy of the model (train-mode BN) on a class-balanced batch, the
    DeepZero protocol. The LPR feeds `bbzo train --lpr lpr.json --resample-every N` (Sparse-CGE).
    """
    if list_only:
        for info in list_scores(with_info=True):
            kind = "query-only" if info.query_only else "white-box"
            click.echo(f"{info.name:<16} {kind:<10} queries: {info.cost:<40} {info.description}")
        return
    given = {}
    if option_items:
        given["options"] = _parse_options(option_items)
    if include_globs:
        given["include"] = include_globs
    s, _src = resolve_command(ctx, PruneSettings, overrides=given)
    lpr = prune_model(s)
    click.echo(f"{s.score}: {lpr.queries} queries, {lpr.extra.get('seconds', 0):.1f} s; kept {lpr.total_kept:,} of "
               f"{lpr.total_size:,} ({1 - lpr.total_kept / lpr.total_size:.1%} sparse)")
    click.echo("| layer | size | kept | kept fraction |\n|---|---:|---:|---:|")
    for n, f in lpr.kept_fraction.items():
        click.echo(f"| {n} | {lpr.size[n]:,} | {lpr.kept[n]:,} | {f:.3f} |")
    click.echo(f"\nwrote {s.out}")
