"""``bbzo train``: train your model through your simulator, no training loop to write.

The options come from :class:`bbzo.tasks.custom.TrainSettings` (one declaration: flags, ``--config``
keys and the saved ``config.resolved.yaml``); ``bbzo train eval RUN --data other.npz`` evaluates a
trained run on another data file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import click

from bbzo.jsonio import dumps
from bbzo.run import run_task
from bbzo.tasks.custom import TASK, TrainSettings, evaluate_run

from .launch import relaunch_if_needed, reports
from .options import MappingParam, config_option, resolve_command, settings_options

__all__ = ["train"]


def _loss(v: Any) -> str:
    return "n/a (no row answered)" if v is None else f"{v:.6g}"


def _report(res: dict[str, Any], s: TrainSettings) -> None:
    spent = res["queries_used"]
    per_step = f"{res['queries_per_step']}/step"
    if res.get("steps") and spent != res["queries_per_step"] * res["steps"]:
        per_step += f"; {spent / max(1, res['steps']):.1f}/step spent on average, setup included"
    click.echo(f"steps {res['steps']} ({'stopped by --max-queries' if res['stopped_by'] == 'max_queries' else 'done'}), "
               f"queries {spent} ({per_step}), oracle rows {res['oracle_rows']}, {res['wall_s']} s")
    failed_val = res.get("val_failed_rows") or 0
    click.echo(f"validation loss: {_loss(res['val_loss_initial'])} before -> {_loss(res['val_loss_final'])} after "
               f"({res['val_rows']} rows" + (f"; {failed_val} rows the black box could not answer are left out"
                                            if failed_val else "") + ")")
    if res.get("oracle_restarts"):
        click.echo(f"oracle restarts: {res['oracle_restarts']} (each is in oracle.stderr.log and results.json)")
    if res.get("failed_rows"):
        what = (f"{res['dropped_samples']} samples dropped from their steps" if s.on_oracle_error == "skip" else
                f"{res['penalized_rows']} entries penalized, {res['dropped_samples']} samples dropped")
        click.echo(f"entries (probe x sample) the oracle could not answer: {res['failed_rows']} "
                   f"({s.on_oracle_error}: {what})")
    click.echo(f"results: {Path(s.out) / 'results.json'}")


@click.group("train", invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@settings_options(TrainSettings)
@click.pass_context
def train(ctx: click.Context, config: Optional[str], **kw: Any) -> None:
    """Train a model through a black box you plug in: a Python oracle or any program (see docs/custom_simulators.md).

    \b
    bbzo train --oracle mypkg.sim:Simulator --model mypkg.net:build --data data.npz
    bbzo train --oracle-cmd "awk -f sim.awk" --model net.py:build --data net.py:make_data --max-queries 100000
    bbzo train --config run.yaml --lr 0.05          # the flag overrides the file
    bbzo train eval --out runs/train --data other.npz   # a trained run on other data
    """
    if ctx.invoked_subcommand is not None:
        return
    settings, sources = resolve_command(ctx, TrainSettings)
    relaunch_if_needed(settings)
    results = run_task(TASK, settings, sources, command=" ".join(["bbzo", *sys.argv[1:]]))
    if reports():
        _report(results, settings)


@train.command("eval")
@click.option("--out", "run_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/train"),
              show_default=True, help="Run folder written by `bbzo train`.")
@click.option("--data", required=True, metavar="FILE|REF", help="Data to evaluate on (as --data of `bbzo train`); every row is used.")
@click.option("--data-kwargs", type=MappingParam(), default=None, help="Keyword arguments for a --data function.")
def eval_cmd(run_dir: Path, data: str, data_kwargs: Optional[dict[str, Any]]) -> None:
    """Loss of a trained run's model on another data file, through the same black box (queries not charged)."""
    res = evaluate_run(run_dir, data, data_kwargs)
    path = run_dir / "eval.json"
    path.write_text(dumps(res, indent=1) + "\n")
    click.echo(f"loss on {data}: {res['loss']:.6g} ({res['rows']} rows, {res['oracle_rows']} oracle rows)")
    click.echo(f"results: {path}")
