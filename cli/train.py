"""``bbzo train``: train your model through your simulator, no training loop to write.

The options are one list (:data:`TRAIN_OPTIONS`) so that later features add an entry here and a field
to :class:`bbzo.tasks.custom.TrainConfig`; every option can also come from ``--config run.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from bbzo.config import Argv, MappingParam, config_option, resolved_config
from bbzo.tasks.custom import LOSSES, TrainConfig, run_training

__all__ = ["train", "TRAIN_OPTIONS"]

_D = TrainConfig()  # the defaults live in one place

TRAIN_OPTIONS: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
    # ---- what is trained, through what
    click.option("--oracle", metavar="REF", default=None,
                 help="The black box in Python: 'pkg.module:attr' or 'path/file.py:attr' naming an Oracle subclass or "
                      "instance, or a plain batched function rows -> rows (wrapped in a FunctionOracle). Give this or "
                      "--oracle-cmd."),
    click.option("--oracle-cmd", type=Argv(), default=None,
                 help="The black box as an external program speaking the bbzo oracle protocol "
                      "(docs/custom_simulators.md), e.g. 'awk -f sim.awk' or './sim --fast'. Split like a shell "
                      "command line but never run through a shell; in a config file also a YAML list."),
    click.option("--oracle-kwargs", type=MappingParam(), default=None,
                 help="Keyword arguments for a Python --oracle class or function, as a YAML/JSON mapping, e.g. "
                      "'{outside: -2}'."),
    click.option("--oracle-array", type=click.Choice(["numpy", "torch"]), default=_D.oracle_array, show_default=True,
                 help="What a plain Python function --oracle receives: numpy arrays (float64 on CPU) or torch tensors."),
    click.option("--oracle-input", default=_D.oracle_input, show_default=True,
                 help="What one oracle row is: the model's outputs, optionally followed by the batch's inputs and/or "
                      "targets (flattened), joined by '+', e.g. 'outputs+inputs' when the simulator also needs the "
                      "conditions the model saw."),
    click.option("--oracle-timeout", type=float, default=_D.oracle_timeout, show_default=True,
                 help="--oracle-cmd: seconds to wait for one answer before the program counts as hung."),
    click.option("--oracle-restarts", type=int, default=_D.oracle_restarts, show_default=True,
                 help="--oracle-cmd: after a crash, timeout or malformed answer, restart the program and re-send the "
                      "query up to N times before failing."),
    click.option("--model", metavar="REF|NAME", default=None,
                 help="The white-box model: 'pkg.module:build' or 'path/file.py:build' (a callable returning an "
                      "nn.Module, or a module instance), or a registered name (see `bbzo models`)."),
    click.option("--model-kwargs", type=MappingParam(), default=None,
                 help="Keyword arguments for the model callable, e.g. '{hidden: 32}'."),
    click.option("--data", metavar="FILE|REF", default=None,
                 help="Training data: an .npz file with arrays 'inputs' and 'targets' (targets optional with --loss "
                      "oracle), a .pt file holding such a dict, or 'module:function' returning (inputs, targets)."),
    click.option("--data-kwargs", type=MappingParam(), default=None,
                 help="Keyword arguments for a --data function, e.g. '{n: 4096}'."),
    click.option("--val-fraction", type=float, default=_D.val_fraction, show_default=True,
                 help="Rows held out (seeded shuffle) to report the loss before and after training; 0 evaluates on "
                      "the training rows."),
    click.option("--loss", default=_D.loss, show_default=True,
                 help=f"How oracle answers become per-sample losses: {LOSSES[0]} (mean squared difference to the "
                      f"targets), {LOSSES[1]} (the oracle returns the loss, one value per row), or 'module:fn' with "
                      "fn(answers, targets) -> (N,) losses."),
    # ---- the zeroth-order estimate and the optimizer
    click.option("--estimator", type=click.Choice(["cge", "sparse_cge", "rge"]), default=_D.estimator,
                 show_default=True,
                 help="Gradient estimator (see `bbzo estimators`): cge costs d+1 queries per step, rge q+1, "
                      "sparse_cge |S|+1."),
    click.option("--estimator-kwargs", type=MappingParam(), default=None,
                 help="More estimator arguments, e.g. '{difference: central}' or for sparse_cge "
                      "'{dense: [\"*.bias\"]}'."),
    click.option("--lpr", type=click.Path(dir_okay=False), default=None,
                 help="Layer-wise pruning ratios from `bbzo prune` (with --estimator sparse_cge): each step "
                      "estimates, per layer, exactly the LPR's number of uniformly drawn coordinates."),
    click.option("--resample-every", type=int, default=_D.resample_every, show_default=True,
                 help="Redraw the sparse coordinate set every N steps (0: draw once). DeepZero: every 5 epochs."),
    click.option("--sparse-others", type=click.Choice(["dense", "sparse", "frozen"]), default=_D.sparse_others,
                 show_default=True,
                 help="Tensors the LPR does not name (BN, biases): estimated densely every step (DeepZero), "
                      "drawn at the global kept fraction, or not trained."),
    click.option("--mu", type=float, default=_D.mu, show_default=True, help="Finite-difference step."),
    click.option("--q", type=int, default=None, help="rge: random directions per step (default 192)."),
    click.option("--lr", type=float, default=_D.lr, show_default=True, help="Learning rate."),
    click.option("--optimizer", type=click.Choice(["adam", "sgd", "adamw"]), default=_D.optimizer, show_default=True,
                 help="torch optimizer fed with the estimate (sgd with momentum 0.9)."),
    click.option("--schedule", type=click.Choice(["cosine", "constant"]), default=_D.schedule, show_default=True,
                 help="Learning-rate schedule: cosine decay after a 5% linear warm-up, or constant."),
    click.option("--steps", type=int, default=_D.steps, show_default=True, help="Training steps."),
    click.option("--batch", type=int, default=_D.batch, show_default=True,
                 help="Samples per minibatch; the oracle sees batch x queries-per-step rows per step."),
    click.option("--seed", type=int, default=_D.seed, show_default=True,
                 help="Seed of the model init, data split, shuffling and RGE directions."),
    click.option("--device", default=_D.device, show_default=True, help="cpu, cuda, cuda:1, ..."),
    # ---- budget, outputs, resuming
    click.option("--max-queries", type=int, default=None,
                 help="Query budget: one query is one loss evaluation of one parameter set on the minibatch (batch "
                      "oracle rows). The run stops cleanly before the step that would exceed it, with a checkpoint."),
    click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=_D.out, show_default=True,
                 help="Run folder: metrics.jsonl, checkpoint.pt, model.pt, results.json, config.resolved.yaml, "
                      "oracle.stderr.log."),
    click.option("--resume", is_flag=True, default=False, help="Continue the run in --out from its checkpoint."),
    click.option("--overwrite", is_flag=True, default=False, help="Start over even if --out holds a run."),
    click.option("--checkpoint-every", type=int, default=_D.checkpoint_every, show_default=True,
                 help="Save a checkpoint every N steps (also at the end and when a step fails); 0: only then."),
    click.option("--log-every", type=int, default=_D.log_every, show_default=True,
                 help="Write a metrics.jsonl line every N steps."),
    click.option("--no-progress", is_flag=True, default=False, help="No progress bar."),
]


def _with_options(options: list[Callable[[Callable[..., Any]], Callable[..., Any]]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        for opt in reversed(options):
            f = opt(f)
        return f
    return deco


@click.command("train")
@config_option
@_with_options(TRAIN_OPTIONS)
@click.pass_context
def train(ctx: click.Context, config: Any, **kw: Any) -> None:
    """Train a model through a black box you plug in: a Python oracle or any program (see docs/custom_simulators.md).

    \b
    bbzo train --oracle mypkg.sim:Simulator --model mypkg.net:build --data data.npz
    bbzo train --oracle-cmd "awk -f sim.awk" --model net.py:build --data net.py:make_data --max-queries 100000
    bbzo train --config run.yaml --lr 0.05          # the flag overrides the file
    """
    values, sources = resolved_config(ctx)
    # --oracle and --oracle-cmd name the same thing: the one given on the command line wins over the file's
    for a, b in (("oracle", "oracle_cmd"), ("oracle_cmd", "oracle")):
        if kw.get(a) and kw.get(b) and sources.get(a) == "command line" and sources.get(b) != "command line":
            kw[b] = values[b] = None
            sources[b] = f"config, overridden by --{a.replace('_', '-')} on the command line"
    for k in ("oracle_kwargs", "model_kwargs", "data_kwargs", "estimator_kwargs"):
        kw[k] = values[k] = kw.get(k) or {}
    cfg = TrainConfig(**kw)
    res = run_training(cfg, resolved=values, sources=sources)
    click.echo(f"steps {res['steps']} ({'stopped by --max-queries' if res['stopped_by'] == 'max_queries' else 'done'}), "
               f"queries {res['queries_used']} ({res['queries_per_step']}/step), oracle rows {res['oracle_rows']}, "
               f"{res['wall_s']} s")
    click.echo(f"validation loss: {res['val_loss_initial']:.6g} before -> {res['val_loss_final']:.6g} after "
               f"({res['val_rows']} rows)")
    click.echo(f"results: {Path(cfg.out) / 'results.json'}")
