"""``bbzo sol``: ZO-SOL -- train a PDE corrector through a non-differentiable PhiFlow solver.

    bbzo sol run --preset demo --out runs/sol-demo          # everything: data, 5 methods, table, plots
    bbzo sol generate --preset small --data-dir runs/sol-data
    bbzo sol train --method zo --preset small --out runs/sol-small
    bbzo sol eval --out runs/sol-small                       # every method trained in that folder
    bbzo sol eval --out runs/sol-small --test-re 250,800,3000   # ... on new held-out Reynolds numbers

Settings come from a preset (``demo``: ~6-7 min on 2 CPU cores; ``small``: the CPU benchmark; ``paper``:
DeepZero Appendix H for a GPU machine), then a ``--config`` file (flat keys, as the flags), then flags;
all of them are declared once in :class:`bbzo.tasks.sol.SolSettings`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Optional

import click

from bbzo.run import Run, run_task
from bbzo.tasks.sol import METHODS, TASK, SolSettings, evaluate_run, generate
from bbzo.tasks.sol.data import _paths

from .launch import relaunch_if_needed, reports
from .options import CommaList, config_option, resolve_command, settings_options

_RUN_FLAGS = ("out", "resume", "overwrite", "no_plots", "methods")


def _command_line() -> str:
    return " ".join(["bbzo", *sys.argv[1:]])


@click.group("sol")
def sol() -> None:
    """ZO-SOL: train a PDE corrector through a non-differentiable PhiFlow solver (DeepZero §6.2)."""


@sol.command("generate")
@config_option
@settings_options(SolSettings, exclude=_RUN_FLAGS)
@click.option("--force", is_flag=True, help="Regenerate even if cached data exists.")
@click.pass_context
def generate_cmd(ctx: click.Context, config: Optional[str], force: bool, **_: Any) -> None:
    """Make (or reuse) the high-fidelity reference data: warm-up, record, downsample, cache."""
    import torch

    torch.set_num_threads(1)
    s, _src = resolve_command(ctx, SolSettings)
    data = generate(s.data, s.data_dir, progress=not s.no_progress, force=force, device=s.device)
    npz, _meta = _paths(s.data, s.data_dir)
    click.echo(f"reference data: {npz}  (train {tuple(data.train.shape)}, test {tuple(data.test.shape)})")
    if data.meta:
        click.echo(f"generated in {data.meta.get('generate_seconds')} s; wake probe amplitude per Re: "
                   f"{data.meta.get('wake_probe_amplitude')}")


@sol.command("train")
@config_option
@settings_options(SolSettings, exclude=("methods",))
@click.option("--method", type=click.Choice(list(METHODS)), default="zo", show_default=True,
              help="zo = ZO-SOL (black box), nog = unrolled with no solver gradient, fo = FO-SOL (white-box "
                   "reference), non = supervised one-step, src = none.")
@click.pass_context
def train_cmd(ctx: click.Context, config: Optional[str], method: str, **_: Any) -> None:
    """Train one method into OUT/METHOD (data generated first if it is not cached)."""
    s, sources = resolve_command(ctx, SolSettings, defaults={"out": Path("runs/sol")})
    relaunch_if_needed(s)
    res = run_task(TASK, s, sources, trainings=[method], evaluate=False, command=_command_line())
    if reports():
        click.echo(json.dumps(res["trainings"][method], indent=1))


@sol.command("run")
@config_option
@settings_options(SolSettings)
@click.pass_context
def run_cmd(ctx: click.Context, config: Optional[str], **_: Any) -> None:
    """Everything: reference data, SRC / NON / NOG / ZO-SOL / FO-SOL, the MAE table and the pictures."""
    s, sources = resolve_command(ctx, SolSettings)
    relaunch_if_needed(s)
    summary = run_task(TASK, s, sources, command=_command_line())
    if not reports():
        return
    click.echo("\n" + summary["table"])
    click.echo(f"\nresults: {s.out / 'results.json'}  (total {summary['total_seconds']} s)")
    for p in summary["plots"]:
        click.echo(f"plot:    {p}")


@sol.command("eval")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/sol"), show_default=True,
              help="Run folder written by `bbzo sol train` / `bbzo sol run`.")
@click.option("--methods", type=CommaList(), default=",".join(METHODS), show_default=True,
              help="Methods to evaluate (those not trained in OUT are skipped, src always works).")
@click.option("--data-dir", type=click.Path(path_type=Path),
              help="Reference data folder (default: the one the run in OUT was trained on).")
@click.option("--eval-steps", type=int, help="Override the rollout length (0: every recorded frame).")
@click.option("--test-re", type=CommaList(float), default=None,
              help="Evaluate on these held-out Reynolds numbers instead (comma-separated): their reference data is "
                   "generated for the run's other settings, and the results go to OUT/eval-re-<...>/.")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
def eval_cmd(out: Path, methods: tuple[str, ...], data_dir: Optional[Path], eval_steps: Optional[int],
             test_re: Optional[tuple[float, ...]], no_plots: bool) -> None:
    """Test MAE per Re and overall (JSON + Markdown table) and the pictures, for every trained method."""
    import torch

    torch.set_num_threads(1)
    s: SolSettings = Run.settings_of(out, TASK)
    changes: dict[str, Any] = {}
    if data_dir is not None:
        changes["data_dir"] = data_dir
    if eval_steps is not None:
        changes["eval_steps"] = eval_steps
    dest = out
    data = None
    if test_re is not None:
        changes["test_re"] = tuple(test_re)
        tag = ",".join(f"{r:g}" for r in test_re)
        dest = out / f"eval-re-{tag if len(tag) <= 40 else hashlib.sha1(tag.encode()).hexdigest()[:10]}"
    s = dataclasses.replace(s, **changes)
    if test_re is not None:
        data = generate(s.data, s.data_dir, progress=True, device=s.device)
    summary = evaluate_run(s, out, tuple(methods), data=data, plots=not no_plots, write_to=dest)
    click.echo("\n" + summary["table"])
    click.echo(f"\nresults: {dest / 'eval.json'}")
    for p in summary["plots"]:
        click.echo(f"plot:    {p}")
