"""``bbzo check``: look at a black box before training through it (docs/check.md).

    bbzo check --config examples/custom_simulator/run.yaml     # a `bbzo train` config: oracle, model, data, loss
    bbzo check --oracle-cmd "./sim --fast" --input-range 0,1   # a program alone, on random rows in a box
    bbzo check --oracle sim.py:simulate --rows rows.npz        # a Python oracle alone, on your rows
    bbzo check sol --preset demo                               # ZO-SOL's PhiFlow solver with its corrector

Each prints a table (determinism, noise floor, the finite-difference step, cost, input range, and what to
change), and writes ``check.json`` and ``check.png`` to ``--out``. This module builds the :class:`Subject`
(:mod:`bbzo.check`) from a task's settings: :func:`custom_subject` for ``bbzo train`` settings,
:func:`sol_subject` for ZO-SOL's.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import click
import numpy as np
import torch

from bbzo.check import OutputSpace, ParameterSpace, RolloutSpace, RowSpace, Subject, check, format_report, \
    plot_report, write_json
from bbzo.errors import ConfigError
from bbzo.tasks.custom import TrainSettings
from bbzo.tasks.defense import FinetuneSettings
from bbzo.tasks.sol import SolSettings

from .options import CommaList, config_option, resolve_command, settings_options

__all__ = ["check_cmd", "custom_subject", "sol_subject", "defense_subject", "estimator_costs"]

#: `bbzo train` settings that decide what is checked (the others -- lr, steps, ... -- may be in the config and are ignored)
TRAIN_KEYS = ("oracle", "oracle_cmd", "oracle_kwargs", "oracle_array", "oracle_input", "oracle_timeout",
              "oracle_startup_timeout", "oracle_workers", "model", "model_kwargs", "data", "data_kwargs", "val_fraction",
              "loss", "estimator", "estimator_kwargs", "mu", "q", "batch", "seed", "device", "no_progress", "no_plots")
SOL_KEYS = ("preset", "train_re", "test_re", "nx", "ny", "factor", "warmup", "frames", "poke", "data_dir", "corrector",
            "unroll", "batch", "init", "sparsity", "mu", "sets_per_call", "backend", "seed", "device", "no_progress",
            "no_plots")
DEFENSE_KEYS = ("data", "classifier", "weights", "num_classes", "mean", "std", "output", "max_batch", "sigma", "depth",
                "width", "subset", "denoiser", "layers", "budget", "q", "mu", "batch", "seed", "device", "no_progress",
                "no_plots")
#: the defense's check is sized for a CPU: a DnCNN forward per perturbed parameter set and image
DEFENSE_DEFAULTS = {"batch": 4}
DEFENSE_MUS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
PARAM_ESTIMATORS = ("cge", "sparse_cge", "rge")
OUTPUT_ESTIMATORS = ("oracle_cge", "oracle_rge")
SPARSE_KEEP = 0.1  # sparse_cge's row in the cost table: 10% of the coordinates (DeepZero's 90% gradient sparsity)


# ---------------------------------------------------------------------------- subjects
def estimator_costs(params: dict[str, torch.Tensor], *, keep: float = SPARSE_KEEP, q: Optional[int] = None,
                    out_width: Optional[int] = None) -> list[tuple[str, int, str]]:
    """``[(estimator, queries per step, note)]`` for this model (the registered estimators' own counts)."""
    import bbzo

    d = sum(int(p.numel()) for p in params.values())
    rows = [("cge", bbzo.create_estimator("cge").query_cost(params), f"every one of the {d} coordinates"),
            ("sparse_cge", math.ceil(keep * d) + 1, f"{keep:.0%} of the coordinates per step")]
    rq = q or d
    rows.append(("rge", bbzo.create_estimator("rge", q=rq).query_cost(params), f"q = {rq} random directions"))
    if out_width is not None:
        rows.append(("oracle_cge", bbzo.create_estimator("oracle_cge", width=out_width).query_cost(params),
                     f"one per model output ({out_width}), autograd through the model"))
    return rows


def _input_parts(spec: str) -> list[str]:
    from bbzo.tasks.custom import ORACLE_INPUT_PARTS

    parts = [p.strip() for p in spec.replace(",", "+").split("+") if p.strip()]
    if any(p not in ORACLE_INPUT_PARTS for p in parts) or "outputs" not in parts or len(set(parts)) != len(parts):
        raise ConfigError(f"--oracle-input {spec!r}: join distinct parts of {', '.join(ORACLE_INPUT_PARTS)} with '+', "
                          "and include outputs, e.g. 'outputs' or 'outputs+inputs'.")
    return parts


def _rows_for_bare(oracle: Any, rows: Optional[str], box: Optional[tuple[float, float]], d_in: Optional[int],
                   n: int, seed: int) -> torch.Tensor:
    """The rows a bare oracle is checked at: ``--rows`` (a file or reference, as --data), else uniform in ``--input-range``."""
    if rows:
        from bbzo.references import load_data

        x, _ = load_data(rows, {})
        return x[:n].double() if x.is_floating_point() else x[:n]
    shape = tuple(oracle.input_shape) if oracle.input_shape is not None else ((d_in,) if d_in else None)
    if shape is None:
        raise ConfigError("this oracle declares no row width: give --d-in N (values per row), or --rows FILE|REF.")
    if box is None:
        raise ConfigError("a bare oracle needs rows to be checked at: --rows FILE|REF (an .npz with 'inputs', or a "
                          "function returning them), or --input-range LO,HI for uniform random rows; or pass "
                          "--config run.yaml to check it with your model and data.")
    g = torch.Generator().manual_seed(seed)
    lo, hi = box
    return lo + (hi - lo) * torch.rand((n, *shape), generator=g, dtype=torch.float64)


def custom_subject(s: Any, *, sources: Optional[dict[str, str]] = None, weights: Optional[Path] = None,
                   rows: Optional[str] = None, box: Optional[tuple[float, float]] = None,
                   d_in: Optional[int] = None) -> Subject:
    """The subject of a ``bbzo train`` config (:class:`~bbzo.tasks.custom.TrainSettings`): the oracle, the model at
    its initial (or ``weights``) parameters on the first training minibatch, and the objective; with no model, the
    bare oracle at ``rows`` or uniform rows in ``box``."""
    from bbzo.tasks.custom import build_oracle, make_objective

    oracle = build_oracle(s)
    try:
        kind = "program" if s.oracle_cmd else "Python"
        spawn = None
        if s.oracle_cmd:
            from bbzo.oracles.process import ProcessPool

            def spawn(k: int) -> Any:
                return ProcessPool(s.oracle_cmd, k, timeout=s.oracle_timeout, startup_timeout=s.oracle_startup_timeout)
        if not s.model:
            mu_given = sources is not None and sources.get("mu", "default") != "default"
            x = _rows_for_bare(oracle, rows, box, d_in, s.batch, s.seed)
            space = RowSpace(oracle, x, mu=s.mu if mu_given else None)
            return Subject(oracle, x, spaces=[space], spawn=spawn, copies=s.oracle_workers if s.oracle_cmd else 1,
                           estimators=[
                ("oracle_cge", int(x[0].numel()) + 1, "one query per input value (with a white-box model in front)")],
                label=f"{oracle.name} ({kind} oracle alone, {x.shape[0]} rows of {int(x[0].numel())} values; a random "
                      "projection of its answers is differentiated)",
                info={"oracle_kind": kind, "rows_from": rows or f"uniform in {box}"})
        subject = _model_subject(s, oracle, kind, spawn, weights)
        subject.copies = s.oracle_workers if s.oracle_cmd else 1
        return subject
    except BaseException:
        oracle.close()
        raise


def _model_subject(s: Any, oracle: Any, kind: str, spawn: Optional[Callable[[int], Any]],
                   weights: Optional[Path]) -> Subject:
    """The model in front of the oracle, on the first training minibatch (the split and order of `bbzo train`)."""
    from bbzo.data import TensorBatches
    from bbzo.tasks.custom import make_objective
    from bbzo.references import build_model, load_data

    if not s.data:
        raise ConfigError("--model needs --data (the inputs the model sees), as for bbzo train.")
    parts = _input_parts(s.oracle_input)
    dev = torch.device(s.device)
    torch.manual_seed(s.seed)
    np.random.seed(s.seed)
    x, y = load_data(s.data, s.data_kwargs)
    torch.manual_seed(s.seed)
    model = build_model(s.model, s.model_kwargs).to(dev)
    if weights is not None:
        try:
            model.load_state_dict(torch.load(weights, map_location=dev, weights_only=True))
        except Exception as e:
            raise ConfigError(f"--weights {weights} does not fit the model ({type(e).__name__}: {str(e)[:200]}).") from None
    pdtype = next((p.dtype for p in model.parameters()), torch.get_default_dtype())
    x = x.to(pdtype) if x.is_floating_point() else x
    y = y.to(pdtype) if y is not None and y.is_floating_point() else y
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(s.seed))  # bbzo train's split
    n_val = math.floor(s.val_fraction * x.shape[0])
    tr = perm[n_val:] if n_val > 0 else perm
    batch = min(s.batch, int(tr.numel()))
    xb, yb = TensorBatches(x[tr], y[tr] if y is not None else None, batch, seed=s.seed, device=dev).get_batch(0)
    objective = make_objective(oracle, s.loss, parts)
    model.eval()
    with torch.no_grad():
        try:
            out = model(xb)
        except Exception as e:
            raise ConfigError(f"the model {s.model!r} fails on the data's inputs of shape {tuple(xb.shape[1:])}: "
                              f"{type(e).__name__}: {str(e)[:200]}.") from e
        rows = objective.rows(out, xb, yb)
    if oracle.input_shape is not None and tuple(rows.shape[1:]) != tuple(oracle.input_shape):
        raise ConfigError(f"the oracle {oracle.name!r} takes rows of {tuple(oracle.input_shape)} values, but --oracle-input "
                          f"{s.oracle_input} gives {tuple(rows.shape[1:])} (model outputs {tuple(out.shape[1:])}).")
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    d = sum(p.numel() for p in params.values())
    on_outputs = s.estimator in OUTPUT_ESTIMATORS
    pspace = ParameterSpace(model, objective, xb, yb, mu=None if on_outputs else s.mu, needs_inputs=objective.needs_inputs)
    ospace = OutputSpace(out, objective, xb, yb, mu=s.mu if on_outputs else None, needs_inputs=objective.needs_inputs)
    width = int(out[0].numel())
    return Subject(oracle, rows, spaces=[ospace, pspace] if on_outputs else [pspace, ospace], spawn=spawn,
                   estimators=estimator_costs(params, q=s.q, out_width=width),
                   label=f"{oracle.name} ({kind} oracle), model {s.model} ({d:,} parameters, {width} outputs), batch "
                         f"{batch}, {s.estimator} at mu {s.mu:g}",
                   info={"oracle_kind": kind, "model": s.model, "params": int(d), "model_outputs": width,
                         "estimator": s.estimator, "mu": s.mu, "weights": str(weights) if weights else None})


def sol_subject(s: Any, *, weights: Optional[Path] = None, progress: bool = True) -> Subject:
    """ZO-SOL's subject (:class:`~bbzo.tasks.sol.SolSettings`): the PhiFlow solver (query-only), the corrector inside
    the loop at its starting (or ``weights``) parameters, on the first training batch; and the solver alone, one
    step from the batch's states scored by the error to the next reference frame."""
    from bbzo.tasks.sol import RolloutBatches, generate, load_corrector, make_corrector, make_rollout
    from bbzo.tasks.sol.methods import karman_oracle

    data = generate(s.data, s.data_dir, progress=progress, device=s.device)
    dev = torch.device(s.device)
    if weights is not None:
        model = load_corrector(s, data, weights)
    elif s.init == "non":
        raise ConfigError("--init non starts from the trained NON corrector: pass it with --weights OUT/non/corrector.pt.")
    else:
        model = make_corrector(s, data).to(dev)
    oracle = karman_oracle(s, "phiflow-karman(check)")
    std = data.velocity_std().to(dev)
    rollout = make_rollout(oracle.query, std)
    (x, re), y = RolloutBatches(data.train, data.train_re, s.unroll, s.batch, seed=s.seed, device=dev).get_batch(0)
    scale = (1.0 / std).view(1, 2, 1, 1)
    nxt = y[:, 0]

    def one_step(answers: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # in the answers' dtype, as training
        return ((answers - nxt[index].to(answers.dtype)) * scale.to(answers.dtype)).pow(2).flatten(1).mean(1)

    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    d = sum(p.numel() for p in params.values())
    costs = estimator_costs(params, keep=1 - s.sparsity)
    costs = [(n, q, note + (" (ZO-SOL's recipe)" if n == "sparse_cge" else "")) for n, q, note in costs]
    spaces = [RolloutSpace(model, rollout, (x, re), y, mu=s.mu),
              RowSpace(oracle, x, (re,), loss=one_step, estimators=())]
    for sp in spaces:  # PhiFlow calls as ZO-SOL makes them: sets_per_call perturbed correctors x the batch
        sp.max_rows = s.sets_per_call * s.batch
    return Subject(oracle, x, (re,), spaces=spaces, estimators=costs, calls_per_query=s.unroll,
                   sets_per_call=s.sets_per_call,
                   label=f"{oracle.name}, corrector '{s.corrector}' in the loop ({d:,} parameters), {s.unroll} unrolled "
                         f"steps x batch {s.batch}, sparse cge at mu {s.mu:g}",
                   info={"oracle_kind": "PhiFlow (in process)", "corrector": s.corrector, "params": int(d),
                         "unroll": s.unroll, "mu": s.mu, "preset": s.preset, "init": s.init,
                         "weights": str(weights) if weights else None,
                         "note": "space 'oracle inputs' is the solver alone: one step from the batch's states, loss = "
                                 "normalised squared error to the next reference frame"})


def defense_subject(s: Any) -> Subject:
    """The certified defense's subject (:class:`~bbzo.tasks.defense.FinetuneSettings`): the query-only classifier
    (``--classifier``, ``--weights``), the denoiser in front of it (``--denoiser``; a fresh DnCNN otherwise) with the
    layers DeepZero fine-tunes trainable, on the first noisy minibatch; the loss is the stability loss against
    ``argmax f(x)``."""
    from bbzo.objective import OracleObjective
    from bbzo.tasks.defense import NoisyBatches, load_denoiser, load_images, make_denoiser, make_oracle
    from bbzo.tasks.defense.methods import stability_loss

    data = load_images(s.data, s.subset or max(64, 4 * s.batch), 0, s.seed)
    oracle = make_oracle(s, name="classifier(check)")
    try:
        model = (load_denoiser(s, s.denoiser) if s.denoiser else make_denoiser(s)).eval()
        last = f"dncnn.{len(model.dncnn) - 1}.weight"
        if s.layers == "last":  # DeepZero fine-tunes the last convolution only
            for n, p in model.named_parameters():
                p.requires_grad_(n == last)
        xb, clean = NoisyBatches(data.train_x, None, min(s.batch, data.train_x.shape[0]), s.sigma, seed=s.seed,
                                 device=s.device).get_batch(0)
        with torch.no_grad():
            targets = oracle.query(clean).argmax(1)  # argmax f(x): the stability targets
            denoised = model(xb)
        objective = OracleObjective(oracle, lambda a, o, i, t: stability_loss(a, o, i, t, output=s.output),
                                    needs_inputs=False)
    except BaseException:
        oracle.close()
        raise
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    d = sum(p.numel() for p in params.values())
    width = int(denoised[0].numel())
    costs = [("sparse_cge", min(s.budget, d) + 1, f"zo: {min(s.budget, d)} coordinates of the tuned layers"),
             ("cge", d + 1, f"every one of the {d} tuned coordinates"),
             ("oracle_rge", s.q + 1, f"zo-ds: q = {s.q} directions on the denoised image"),
             ("oracle_cge", width + 1, f"one per pixel value of the denoised image ({width})")]
    spaces = [ParameterSpace(model, objective, xb, targets, mu=s.mu, needs_inputs=False),
              OutputSpace(denoised, objective, xb, targets, mu=s.mu, needs_inputs=False)]
    for sp in spaces:
        sp.max_rows = s.max_batch
    return Subject(oracle, denoised, spaces=spaces, estimators=costs,
                   label=f"{oracle.name} ({s.classifier}), DnCNN {s.depth}x{s.width} in front ({d:,} tuned parameters, "
                         f"{s.denoiser or 'fresh'}), batch {xb.shape[0]}, "
                         f"sigma {s.sigma:g}, mu {s.mu:g}",
                   info={"oracle_kind": "classifier (in process)", "classifier": s.classifier,
                         "classifier_weights": str(s.weights) if s.weights else None, "params": int(d),
                         "model_outputs": width, "mu": s.mu, "sigma": s.sigma, "layers": s.layers})


# ---------------------------------------------------------------------------- the command
def _check_options(f: Optional[Callable[..., Any]] = None, *, weights: bool = True) -> Any:
    """The options every ``bbzo check`` command has (``weights=False``: the task has its own ``--weights``)."""
    if f is None:
        return lambda g: _check_options(g, weights=weights)
    opts = [
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/check"),
                     show_default=True, help="Folder for check.json and check.png."),
        click.option("--coords", type=int, default=8, show_default=True,
                     help="Coordinates per space in the step sweep (spread over the parameter tensors)."),
        click.option("--mus", type=CommaList(float), default=None,
                     help="Steps of the sweep, comma-separated (default 1e-9 .. 1e-1, two per decade, and the configured mu)."),
        click.option("--repeats", type=int, default=5, show_default=True,
                     help="Evaluations of the current point for the sampling noise."),
        click.option("--explore", type=int, default=64, show_default=True,
                     help="Rows per noise scale in the input-range search (0: only the current rows)."),
        click.option("--input-range", "input_range", type=CommaList(float), default=None, metavar="LO,HI",
                     help="Also explore uniform rows in [LO, HI]; for an oracle alone, the rows it is checked at."),
        click.option("--copies", type=int, default=2, show_default=True,
                     help="--oracle-cmd: copies of the program for the --oracle-workers measurement (1: skip it)."),
        click.option("--sections", type=CommaList(choices=("determinism", "noise", "step", "cost", "range")),
                     default=None, help="Only these measurements (default all): determinism,noise,step,cost,range."),
    ]
    if weights:
        opts.append(click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
                                 help="Check at these parameters (a state dict, e.g. a run's model.pt / corrector.pt) "
                                      "instead of the initial ones."))
    for o in reversed(opts):
        f = o(f)
    return f


def _finish(report: dict[str, Any], out: Path, plots: bool, s: Any, sources: dict[str, str]) -> None:
    from bbzo.config import as_plain, write_config
    from bbzo.provenance import provenance

    report["provenance"] = provenance()
    report["command"] = " ".join(["bbzo", *sys.argv[1:]])
    report["config"] = as_plain(s)
    path = write_json(report, out / "check.json")
    write_config(out, as_plain(s), sources, header="The settings bbzo check read (the options of the command it checks; "
                 "--config with this file checks the same thing again).")
    png = plot_report(report, out / "check.png") if plots else None
    click.echo(format_report(report))
    click.echo(f"\nwritten: {path}" + (f", {png}" if png else ""))


def _box(kw: dict[str, Any]) -> Optional[tuple[float, float]]:
    box = kw.get("input_range")
    if box is None:
        return None
    if len(box) != 2 or not box[0] < box[1]:
        raise ConfigError(f"--input-range takes two numbers LO,HI with LO < HI, got {','.join(map(str, box))}.")
    return float(box[0]), float(box[1])


def _run(subject: Subject, s: Any, sources: dict[str, str], kw: dict[str, Any]) -> None:
    try:
        report = check(subject, coords=kw["coords"], mus=kw.get("mus"), repeats=kw["repeats"], seed=s.seed,
                       explore=kw["explore"], box=_box(kw), copies=kw["copies"],
                       progress=not s.no_progress,
                       sections=kw.get("sections") or ("determinism", "noise", "step", "cost", "range"))
    finally:
        subject.oracle.close()
    _finish(report, kw["out"], not s.no_plots, s, sources)


@click.group("check", invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@settings_options(TrainSettings, only=TRAIN_KEYS)
@_check_options
@click.option("--rows", default=None, metavar="FILE|REF", help="An oracle alone: the rows to check it at (as --data: "
              "an .npz with 'inputs', or a function returning them).")
@click.option("--d-in", "d_in", type=int, default=None, help="An oracle alone with --input-range: values per row, if "
              "the oracle does not declare it.")
@click.pass_context
def check_cmd(ctx: click.Context, config: Optional[str], **kw: Any) -> None:
    """Look at a black box before training through it: determinism, noise floor, the finite-difference step,
    cost and scaling, input range (docs/check.md).

    \b
    bbzo check --config examples/custom_simulator/run.yaml     # a bbzo train config
    bbzo check --oracle-cmd "./sim" --input-range 0,1          # a program alone
    bbzo check sol --preset demo                               # ZO-SOL's PhiFlow solver
    """
    if ctx.invoked_subcommand is not None:
        return
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    s, sources = resolve_command(ctx, TrainSettings, command="train")
    subject = custom_subject(s, sources=sources, weights=kw.get("weights"), rows=kw.get("rows"), box=_box(kw),
                             d_in=kw.get("d_in"))
    _run(subject, s, sources, kw)


@check_cmd.command("sol")
@config_option
@settings_options(SolSettings, only=SOL_KEYS)
@_check_options
@click.pass_context
def check_sol(ctx: click.Context, config: Optional[str], **kw: Any) -> None:
    """ZO-SOL: the PhiFlow solver with the corrector in the loop (reference data generated first if not cached).

    \b
    bbzo check sol --preset demo
    bbzo check sol --preset small --weights runs/sol-small/zo/corrector.pt
    """
    torch.set_num_threads(1)
    s, sources = resolve_command(ctx, SolSettings, command="sol")
    _box(kw)
    subject = sol_subject(s, weights=kw.get("weights"), progress=not s.no_progress)
    _run(subject, s, sources, kw)


@check_cmd.command("defense")
@config_option
@settings_options(FinetuneSettings, only=DEFENSE_KEYS)
@_check_options(weights=False)
@click.pass_context
def check_defense(ctx: click.Context, config: Optional[str], **kw: Any) -> None:
    """The certified defense: the query-only classifier with the denoiser in front (DeepZero's zo fine-tuning).

    Sized for a CPU by default (--batch 4, --coords 4, one step per decade from 1e-7 to 1e-1): every perturbed
    parameter set is a DnCNN forward per image.

    \b
    bbzo check defense --data ../shared/data/imagenette_32px.npz --weights classifier.pt --denoiser runs/p/model.pt
    """
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    s, sources = resolve_command(ctx, FinetuneSettings, command="finetune", defaults=DEFENSE_DEFAULTS)
    _box(kw)
    if ctx.get_parameter_source("coords") is click.core.ParameterSource.DEFAULT:
        kw["coords"] = 4
    kw["mus"] = kw.get("mus") or sorted(set(DEFENSE_MUS) | {s.mu})
    _run(defense_subject(s), s, sources, kw)
