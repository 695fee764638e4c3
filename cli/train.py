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

from bbzo.tasks.custom import TrainSettings

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
    steps_s = f"; training steps {res['train_s']} s" if res.get("train_s") is not None else ""
    click.echo(f"steps {res['steps']} ({'stopped by --max-queries' if res['stopped_by'] == 'max_queries' else 'done'}), "
               f"queries {spent:,} ({per_step}; a query is one parameter set on a minibatch), oracle rows "
               f"{res['oracle_rows']:,} (rows the black box answered), wall {res['wall_s']} s{steps_s}")
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
    plot = Path(s.out) / "loss.png"
    if plot.exists():
        val = f", validation loss every {s.eval_every} steps" if s.eval_every else ""
        click.echo(f"plot:    {plot} (training loss per step{val})")


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
    bbzo train eval --out runs/train --data other.npz   # a trained run on other data: runs/train/eval-other.json
    """
    if ctx.invoked_subcommand is not None:
        return
    from bbzo.run import run_task
    from bbzo.tasks.custom import TASK

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
    """Loss of a trained run's model on another data file, through the same black box (queries not charged).

    Each data source gets its own file, OUT/eval-<data>.json, which records the source and its --data-kwargs."""
    from bbzo.checkpoint import atomic_write_bytes
    from bbzo.jsonio import dumps
    from bbzo.tasks.custom import evaluate_run

    res = evaluate_run(run_dir, data, data_kwargs, progress=True)
    path = run_dir / eval_file_name(data, data_kwargs)
    text = dumps(res, indent=1) + "\n"
    atomic_write_bytes(path, lambda f: f.write(text.encode()))
    kw = f" with --data-kwargs {dumps(data_kwargs)}" if data_kwargs else ""
    click.echo(f"loss on {data}{kw}: {res['loss']:.6g} (mean over {res['rows']} rows; {res['oracle_rows']} oracle "
               "rows, not charged to the run)")
    click.echo(f"results: {path}")


def eval_file_name(data: str, data_kwargs: Optional[dict[str, Any]]) -> str:
    """One file per data source: ``eval-<data name>-<digest>.json``, the digest of the source (its absolute path,
    or the reference) and its keyword arguments, so no evaluation overwrites another's."""
    import hashlib
    import re

    from bbzo.jsonio import dumps

    ref = str(data)
    path = Path(ref.split(":")[0]) if ":" in ref and not Path(ref).exists() else Path(ref)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem + (f"-{ref.rsplit(':', 1)[1]}" if path != Path(ref) else ""))
    key = dumps({"data": str(Path(ref).resolve()) if Path(ref).exists() else ref, "kwargs": data_kwargs or {}})
    return f"eval-{name.strip('-.') or 'data'}-{hashlib.sha256(key.encode()).hexdigest()[:8]}.json"
