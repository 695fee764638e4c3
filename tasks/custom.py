"""Train your own model through your own simulator: the task behind ``bbzo train``.

Everything is named by the user: the oracle (a Python :class:`~bbzo.oracle.Oracle`, class or batched
function by reference, or an external program speaking the bbzo protocol), the model (a reference to a
callable returning an ``nn.Module``, or a registered model name), the data (an ``.npz``/``.pt`` file or
a reference to a callable). The objective is the model -> oracle -> loss split::

    data batch x --model--> outputs --(+ x, y as --oracle-input says)--> oracle --> answers --loss--> (B,) losses

The query budget (``max_queries``) counts bbzo *queries*, as everywhere in bbzo: one loss evaluation of
one parameter set on the minibatch, i.e. ``batch`` oracle rows. The run stops cleanly before the step
that would exceed it (checkpoint saved, ``stopped_by: max_queries`` in ``results.json``).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

import bbzo
from bbzo.checkpoint import load_weights
from bbzo.config import setting
from bbzo.data import TensorBatches
from bbzo.errors import BbzoError, ConfigError, ShapeError
from bbzo.failures import FailurePolicy
from bbzo.estimators import get_estimator_class, list_estimators
from bbzo.oracle import answering_failures_with_nan
from bbzo.objective import OracleObjective
from bbzo.optim import cosine_with_warmup, make_optimizer
from bbzo.oracle import Oracle, where_raised
from bbzo.run import BuildContext, Run, Training
from bbzo.step import query_cost
from bbzo.task import RunSettings, Task, register_task
from bbzo.references import build_model, build_python_oracle, is_reference, load_data, load_object

__all__ = ["TrainSettings", "LOSSES", "ORACLE_INPUT_PARTS", "make_objective", "build_oracle", "TASK", "evaluate_on"]

LOSSES = ("mse", "oracle")
ORACLE_INPUT_PARTS = ("outputs", "inputs", "targets")


@dataclass
class TrainSettings(RunSettings):
    """The settings of ``bbzo train`` (each one's help is its ``--help`` text)."""

    # ---- what is trained, through what
    oracle: Optional[str] = setting(None, metavar="REF", replaces=("oracle_cmd",), help=(
        "The black box in Python: 'pkg.module:attr' or 'path/file.py:attr' naming an Oracle subclass or instance, or "
        "a plain batched function rows -> rows (wrapped in a FunctionOracle). Give this or --oracle-cmd."))
    oracle_cmd: Optional[list[str]] = setting(None, kind="argv", replaces=("oracle",), runtime=True, help=(
        "The black box as an external program speaking the bbzo oracle protocol (docs/custom_simulators.md), e.g. "
        "'awk -f sim.awk' or './sim --fast'. Split like a shell command line but never run through a shell; in a "
        "config file also a YAML list."))
    oracle_kwargs: dict[str, Any] = setting(default_factory=dict, help=(
        "Keyword arguments for a Python --oracle class or function, as a YAML/JSON mapping, e.g. '{outside: -2}'."))
    oracle_array: str = setting("numpy", choices=("numpy", "torch"), help=(
        "What a plain Python function --oracle receives: numpy arrays (float64 on CPU) or torch tensors."))
    oracle_input: str = setting("outputs", help=(
        "What one oracle row is: the model's outputs, optionally followed by the batch's inputs and/or targets "
        "(flattened), joined by '+', e.g. 'outputs+inputs' when the simulator also needs the conditions the model saw."))
    oracle_timeout: float = setting(60.0, runtime=True, help=(
        "--oracle-cmd: seconds to wait for one answer before the program counts as hung."))
    oracle_startup_timeout: float = setting(30.0, runtime=True, help=(
        "--oracle-cmd: seconds to wait for the program's handshake line after starting it."))
    oracle_workers: int = setting(1, runtime=True, help=(
        "--oracle-cmd: copies of the program to start; each call's rows are split across them in order (a "
        "single-threaded simulator then uses every core) and the answers reassembled exactly."))
    oracle_restarts: int = setting(0, runtime=True, help=(
        "--oracle-cmd: after a crash, timeout or malformed answer, restart the program and re-send the call up to N "
        "times before failing."))
    on_oracle_error: str = setting("stop", choices=("stop", "penalize", "skip"), runtime=True, help=(
        "Rows the black box cannot answer (NaN/inf, or rows an --oracle-cmd program reports as failed): stop the run, "
        "penalize them (a failed row looks uphill, as steep as the steepest answered row along the same probe), or "
        "skip the samples that have one from the whole step (every perturbation and the base, so the differences stay "
        "consistent). Validation then reports the loss over the rows that were answered."))
    oracle_error_penalty: float = setting(1.0, runtime=True, help=(
        "--on-oracle-error penalize: how steep a failed row looks, as a multiple of the steepest answered slope along "
        "the same probe (a fixed loss divided by mu would blow the finite difference up)."))
    model: Optional[str] = setting(None, metavar="REF|NAME", help=(
        "The white-box model: 'pkg.module:build' or 'path/file.py:build' (a callable returning an nn.Module, or a "
        "module instance), or a registered name (see `bbzo models`)."))
    model_kwargs: dict[str, Any] = setting(default_factory=dict, help="Keyword arguments for the model callable, "
                                           "e.g. '{hidden: 32}'.")
    data: Optional[str] = setting(None, metavar="FILE|REF", replaces=("data_kwargs",), help=(
        "Training data: an .npz file with arrays 'inputs' and 'targets' (targets optional with --loss oracle), a .pt "
        "file holding such a dict, or 'module:function' returning (inputs, targets)."))
    data_kwargs: dict[str, Any] = setting(default_factory=dict, help="Keyword arguments for a --data function, "
                                          "e.g. '{n: 4096}'.")
    val_fraction: float = setting(0.1, help=(
        "Rows held out (seeded shuffle) to report the loss before and after training; 0 evaluates on the training rows."))
    loss: str = setting("mse", help=(
        f"How oracle answers become per-sample losses: {LOSSES[0]} (mean squared difference to the targets), "
        f"{LOSSES[1]} (the oracle returns the loss, one value per row), or 'module:fn' with fn(answers, targets) -> "
        "(N,) losses."))
    # ---- the zeroth-order estimate and the optimizer
    estimator: str = setting("cge", choices=tuple(list_estimators(zeroth_order=True)), help=(
        "Gradient estimator (see `bbzo estimators`): cge costs d+1 queries per step, rge q+1, sparse_cge |S|+1."))
    estimator_kwargs: dict[str, Any] = setting(default_factory=dict, help=(
        "More estimator arguments, e.g. '{difference: central}' or for sparse_cge '{dense: [\"*.bias\"]}'."))
    lpr: Optional[str] = setting(None, help=(
        "Layer-wise pruning ratios from `bbzo prune` (with --estimator sparse_cge): each step estimates, per layer, "
        "exactly the LPR's number of uniformly drawn coordinates."))
    resample_every: int = setting(0, help="Redraw the sparse coordinate set every N steps (0: draw once). DeepZero: "
                                  "every 5 epochs.")
    sparse_others: str = setting("dense", choices=("dense", "sparse", "frozen"), help=(
        "Tensors the LPR does not name (BN, biases): estimated densely every step (DeepZero), drawn at the global kept "
        "fraction, or not trained."))
    mu: float = setting(5e-3, help="Finite-difference step.")
    q: Optional[int] = setting(None, help="rge / oracle_rge: random directions per step (rge default: d, the same queries per step as cge).")
    lr: float = setting(0.01, help="Learning rate.")
    optimizer: str = setting("adam", choices=("adam", "sgd", "adamw"), help=(
        "torch optimizer fed with the estimate (sgd with momentum 0.9)."))
    schedule: str = setting("cosine", choices=("cosine", "constant"), help=(
        "Learning-rate schedule: cosine decay after a 5% linear warm-up, or constant. Extending a run with --resume "
        "--steps N continues the cosine over the new length from the resume step on."))
    steps: int = setting(200, runtime=True, help="Training steps.")
    batch: int = setting(32, help="Samples per minibatch; the oracle sees batch x queries-per-step rows per step.")
    seed: int = setting(0, help="Seed of the model init, data split, shuffling and RGE directions.")
    crn: bool = setting(False, help=(
        "Common random numbers: hand the oracle one seed per training step (the base and every probe of a step share "
        "it; derived from --seed and the step, so --resume is exact). For stochastic simulators that take a seed "
        "(docs/check.md)."))
    device: str = setting("cpu", runtime=True, help="cpu, cuda, cuda:1, ...")
    # ---- budget, outputs, resuming
    max_queries: Optional[int] = setting(None, runtime=True, help=(
        "Query budget: one query is one loss evaluation of one parameter set on the minibatch (batch oracle rows). The "
        "run stops cleanly before the step that would exceed it, with a checkpoint; resume with a larger budget."))
    out: Path = setting(Path("runs/train"), kind="path", runtime=True, help=(
        "Run folder: metrics.jsonl, checkpoint.pt, model.pt, results.json, config.resolved.yaml, oracle.stderr.log."))
    checkpoint_every: int = setting(50, runtime=True, help=(
        "Save a checkpoint every N steps (also at the end and when a step fails); 0: only then."))
    log_every: int = setting(1, runtime=True, help="Write a metrics.jsonl line every N steps.")
    eval_every: int = setting(0, runtime=True, help="Evaluate the validation loss every N steps (0: before and after).")

    def __post_init__(self) -> None:
        for name, lo in (("steps", 0), ("batch", 1), ("checkpoint_every", 0), ("log_every", 1),
                         ("oracle_restarts", 0), ("oracle_workers", 1), ("eval_every", 0)):
            if getattr(self, name) < lo:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(self, name)}.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}.")
        if self.max_queries is not None and self.max_queries < 1:
            raise ConfigError(f"--max-queries must be >= 1, got {self.max_queries}.")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}.")
        if not self.mu > 0:
            raise ConfigError(f"--mu must be > 0, got {self.mu}.")
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0 (a seed of numpy's and torch's generators), got {self.seed}.")


# ---------------------------------------------------------------------------- the objective
def _parts(spec: str) -> list[str]:
    parts = [p.strip() for p in spec.replace(",", "+").split("+") if p.strip()]
    bad = [p for p in parts if p not in ORACLE_INPUT_PARTS]
    if bad or "outputs" not in parts or len(set(parts)) != len(parts):
        raise ConfigError(f"--oracle-input {spec!r}: join distinct parts of {', '.join(ORACLE_INPUT_PARTS)} with '+', "
                          "and include outputs (the model must feed the oracle), e.g. 'outputs' or 'outputs+inputs'.")
    return parts


def _custom_loss(loss: str) -> Optional[Callable[..., torch.Tensor]]:
    if loss in LOSSES:
        return None
    if not is_reference(loss):
        raise ConfigError(f"--loss {loss!r}: use mse, oracle, or a reference 'module:function' to "
                          "fn(oracle_outputs, targets) -> (N,) per-sample losses.")
    fn = load_object(loss)
    if not callable(fn):
        raise ConfigError(f"--loss {loss!r} is not callable.")
    return fn


def make_objective(oracle: Oracle, loss: str, parts: list[str]) -> OracleObjective:
    """model outputs (+ inputs/targets) -> oracle rows -> answers -> per-sample losses ``(N,)``."""
    custom = _custom_loss(loss)

    def assemble(outputs: torch.Tensor, inputs: Any, targets: Any) -> torch.Tensor:
        n = outputs.shape[0]
        src = {"outputs": outputs, "inputs": inputs, "targets": targets}
        if "targets" in parts and targets is None:
            raise ConfigError("--oracle-input includes targets but the data have none.")
        return torch.cat([src[p].reshape(n, -1).to(outputs.dtype) for p in parts], dim=1)  # type: ignore[union-attr]

    def per_sample(ans: torch.Tensor, outputs: torch.Tensor, inputs: Any, targets: Any) -> torch.Tensor:
        n = outputs.shape[0]
        if custom is not None:
            try:
                out = custom(ans, targets)
            except BbzoError:
                raise
            except Exception as e:
                raise ConfigError(f"--loss {loss!r} raised {type(e).__name__}{where_raised(e)}: {e}") from e
            if not isinstance(out, torch.Tensor) or out.shape != (n,):
                raise ShapeError(f"--loss {loss!r} must return per-sample losses of shape ({n},), got "
                                 f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}.")
            return out
        flat = ans.reshape(n, -1)
        if loss == "oracle":
            if flat.shape[1] != 1:
                raise ShapeError(f"--loss oracle: the oracle must return one number (the loss) per row, it returned "
                                 f"{flat.shape[1]}. Use --loss mse to compare its outputs with targets.")
            return flat[:, 0]
        if targets is None:
            raise ConfigError("--loss mse needs targets: the data have only inputs (use --loss oracle if the oracle "
                              "returns the loss itself).")
        y = targets.reshape(n, -1).to(flat.dtype)
        if y.shape[1] != flat.shape[1]:
            raise ShapeError(f"--loss mse: the oracle returns {flat.shape[1]} values per row but the targets have "
                             f"{y.shape[1]}.")
        return (flat - y).pow(2).mean(dim=1)

    return OracleObjective(oracle, per_sample, assemble, needs_inputs="inputs" in parts)


def build_oracle(s: TrainSettings, run_dir: Optional[Path] = None) -> Oracle:
    """The black box: ``s.oracle_cmd`` (an external program) or ``s.oracle`` (Python, by reference)."""
    if bool(s.oracle) == bool(s.oracle_cmd):
        raise ConfigError("name the black box once: --oracle REF (Python) or --oracle-cmd 'program args' (an "
                          "external program speaking the bbzo protocol)." if s.oracle else
                          "no black box given: pass --oracle REF (a Python oracle) or --oracle-cmd 'program args'.")
    if s.oracle_cmd:
        from bbzo.oracles.process import ProcessOracle, ProcessPool
        if s.oracle_kwargs:
            raise ConfigError("--oracle-kwargs apply to a Python --oracle, not to --oracle-cmd (pass program arguments "
                              "in the command).")
        kw = dict(timeout=s.oracle_timeout, startup_timeout=s.oracle_startup_timeout, restarts=s.oracle_restarts,
                  stderr_log=(run_dir / "oracle.stderr.log") if run_dir is not None else None)
        if s.oracle_workers > 1:
            return ProcessPool(s.oracle_cmd, s.oracle_workers, **kw)
        return ProcessOracle(s.oracle_cmd, **kw)
    assert s.oracle is not None
    return build_python_oracle(s.oracle, s.oracle_kwargs, s.oracle_array)


def _make_estimator(s: TrainSettings, params: dict[str, torch.Tensor], width: Optional[int] = None) -> Any:
    """The registered estimator with the run's mu, seed, q and the model's output width where its signature takes them."""
    accepted = inspect.signature(get_estimator_class(s.estimator)).parameters
    kw = dict(s.estimator_kwargs)
    for key, value in (("mu", s.mu), ("seed", s.seed), ("width", width)):
        if key in accepted:
            kw.setdefault(key, value)
    if s.q is not None:
        if "q" not in accepted:
            raise ConfigError(f"--q sets the number of random directions; --estimator {s.estimator} takes none.")
        kw.setdefault("q", s.q)
    est = bbzo.create_estimator(s.estimator, **kw)
    if s.lpr:
        from bbzo.sparsity import LayerRatios, dynamic_sparse_cge

        if not est.info.supports_sparse or est.info.needs_surrogate:
            raise ConfigError(f"--lpr trains with a sparse gradient: use --estimator sparse_cge (got {s.estimator}).")
        est = dynamic_sparse_cge(LayerRatios.load(s.lpr), params, resample_every=s.resample_every, seed=s.seed,
                                 others=s.sparse_others, estimator=est)
    return est


# ---------------------------------------------------------------------------- the task
@dataclass
class _Data:
    train: TensorBatches
    val_x: torch.Tensor
    val_y: Optional[torch.Tensor]


def _load(s: TrainSettings, dev: torch.device) -> tuple[nn.Module, _Data]:
    """Data and a freshly built model, seeded; the split and the batch order are functions of the seed."""
    if not s.model:
        raise ConfigError("--model is required: a registered name (bbzo models) or 'module:callable' returning an nn.Module.")
    if not s.data:
        raise ConfigError("--data is required: an .npz file with 'inputs' and 'targets', or 'module:callable'.")
    torch.manual_seed(s.seed)
    np.random.seed(s.seed)
    x, y = load_data(s.data, s.data_kwargs)
    torch.manual_seed(s.seed)
    model = build_model(s.model, s.model_kwargs).to(dev)
    pdtype = next((p.dtype for p in model.parameters()), torch.get_default_dtype())
    x = x.to(pdtype) if x.is_floating_point() else x
    y = y.to(pdtype) if y is not None and y.is_floating_point() else y
    g = torch.Generator().manual_seed(s.seed)
    perm = torch.randperm(x.shape[0], generator=g)
    n_val = math.floor(s.val_fraction * x.shape[0])
    tr, va = (perm[n_val:], perm[:n_val]) if n_val > 0 else (perm, perm)
    if s.batch > tr.numel():
        raise ConfigError(f"--batch {s.batch} is larger than the {tr.numel()} training rows.")
    batches = TensorBatches(x[tr], y[tr] if y is not None else None, s.batch, seed=s.seed, device=dev)
    return model, _Data(batches, x[va].to(dev), y[va].to(dev) if y is not None else None)


def evaluate_on(model: nn.Module, objective: OracleObjective, x: torch.Tensor, y: Optional[torch.Tensor],
                chunk: int = 1024, tolerate_failures: bool = False, progress: bool = False,
                desc: str = "validation loss") -> dict[str, Any]:
    """Mean loss of ``model`` on rows ``x`` (eval mode; the caller decides whether the queries are charged).

    ``tolerate_failures``: rows the black box cannot answer are left out of the mean (and counted in
    ``failed_rows``) instead of stopping; ``loss`` is None when no row was answered. ``progress``: a bar of rows.
    """
    from bbzo.listeners import counting

    was_training = model.training
    model.eval()
    total, n, failed = 0.0, x.shape[0], 0
    with torch.no_grad(), answering_failures_with_nan(tolerate_failures), \
            counting(desc, total=int(n), unit="row", enabled=progress) as tick:
        for i in range(0, n, chunk):
            xi = x[i:i + chunk]
            per = objective(model(xi), xi, y[i:i + chunk] if y is not None else None).double()
            ok = torch.isfinite(per)
            failed += int((~ok).sum())
            total += float(per[ok].sum())
            tick(int(xi.shape[0]))
    model.train(was_training)
    answered = n - failed
    out: dict[str, Any] = {"loss": total / answered if answered else None, "rows": answered}
    if tolerate_failures:
        out["failed_rows"] = failed
    return out


def _check_width(s: TrainSettings, model: nn.Module, oracle: Oracle, data: _Data, parts: list[str]) -> int:
    """One unperturbed forward (eval mode: BN statistics untouched): does the oracle take rows this wide?

    Returns the model's output values per sample (what the chain-rule estimators perturb)."""
    xb, tb = data.train.get_batch(0)
    was_training = model.training
    try:
        with torch.no_grad():
            probe_out = model.eval()(xb[:1])
    except Exception as e:  # the model does not take the data's inputs: one line, not a traceback
        raise ConfigError(f"the model {s.model!r} fails on one input row of shape {tuple(xb.shape[1:])}: "
                          f"{type(e).__name__}{where_raised(e)}: {str(e)[:200]}. Make its input fit --data.") from e
    finally:
        model.train(was_training)
    if not isinstance(probe_out, torch.Tensor):
        raise ConfigError(f"the model {s.model!r} returns {type(probe_out).__name__}; the oracle needs one tensor of "
                          "rows per sample.")
    src = {"outputs": probe_out, "inputs": xb[:1], "targets": tb}
    if src["targets"] is None and "targets" in parts:
        raise ConfigError("--oracle-input includes targets but the data have none.")
    width = sum(int(src[p].reshape(1, -1).shape[1]) for p in parts)  # type: ignore[union-attr]
    if oracle.input_shape is not None and (width,) != tuple(oracle.input_shape):
        raise ConfigError(f"the oracle {oracle.name!r} takes rows of {tuple(oracle.input_shape)} values, but "
                          f"--oracle-input {s.oracle_input} gives {width} per row (model outputs "
                          f"{tuple(probe_out.shape[1:])}). Change the model or --oracle-input.")
    return int(probe_out.reshape(1, -1).shape[1])


def build(s: TrainSettings, name: str, ctx: BuildContext) -> Training:
    parts = _parts(s.oracle_input)
    dev = torch.device(s.device)
    model, data = _load(s, dev)
    oracle = build_oracle(s, ctx.folder)
    try:
        objective = make_objective(oracle, s.loss, parts)
        width = _check_width(s, model, oracle, data, parts)
        if s.crn and not oracle.accepts_seed:
            raise ConfigError(f"--crn hands the oracle a seed per step, but {oracle.name} takes none: give its function a "
                              "'seed' parameter (or its program the protocol's seed capability), or drop --crn.")
        policy = FailurePolicy(s.on_oracle_error, s.oracle_error_penalty)
        params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
        est = _make_estimator(s, params, width)
        q_step = query_cost(est, params, est.init(params), policy)
        if est.info.supports_sparse and q_step <= 1:
            raise ConfigError("sparse_cge has no coordinates to estimate: give a set with --estimator-kwargs "
                              "'{coords: {\"0.weight\": [0, 1, 2]}}' or '{dense: [\"*\"]}'.")
        if s.max_queries is not None and q_step > s.max_queries and not ctx.resuming:
            raise ConfigError(f"--max-queries {s.max_queries} is less than one step ({q_step} queries with "
                              f"{s.estimator} on {sum(p.numel() for p in params.values())} parameters).")
        opt = make_optimizer(model.parameters(), s.optimizer, lr=s.lr)
        sched = cosine_with_warmup(opt, max(1, s.steps), warmup_steps=max(1, s.steps) // 20) \
            if s.schedule == "cosine" else None
    except BaseException:
        oracle.close()
        raise
    return Training(
        model=model, objective=objective, estimator=est, optimizer=opt, data=data.train, steps=s.steps,
        scheduler=sched, oracles=[oracle],
        evaluate=lambda m: _validation(evaluate_on(m, objective, data.val_x, data.val_y,
                                                   tolerate_failures=policy.tolerant, progress=ctx.run.progress)),
        eval_every=s.eval_every, checkpoint_every=s.checkpoint_every, log_every=s.log_every, weights="model.pt",
        desc=f"{s.estimator} ({q_step} q/step)", log_extra={"estimator": s.estimator},
        trainer_kw={"failures": policy, "crn_seed": s.seed if s.crn else None},
        summary=lambda tr: {"oracle_restarts": getattr(oracle, "restarts_used", 0),
                            "oracle_restart_log": list(getattr(oracle, "restart_log", [])),
                            **tr.failure_totals})


def _validation(res: dict[str, Any]) -> dict[str, Any]:
    """``evaluate_on``'s numbers named as what they are (``val_loss``: metrics.jsonl's ``eval_val_loss``, the
    dashed validation curve of loss.png)."""
    return {f"val_{k}": v for k, v in res.items()}


def evaluate(s: TrainSettings, run: Run, summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    t = summaries[""]
    out = Path(s.out)
    return {
        "status": t["status"], "steps": t["steps"], "stopped_by": t["stopped_by"],
        "resumed_from_step": t["resumed_from_step"], "params": t["params"], "queries_per_step": t["queries_per_step"],
        "queries_used": t["queries"], "max_queries": s.max_queries, "oracle_rows": t["oracle_rows"],
        "oracle_restarts": t.get("oracle_restarts", 0), "oracle_restart_log": t.get("oracle_restart_log", []),
        "on_oracle_error": s.on_oracle_error, "failed_rows": t.get("failed_rows", 0),
        "dropped_samples": t.get("dropped_samples", 0), "penalized_rows": t.get("penalized_rows", 0),
        "wall_s": t["wall_s"], "setup_s": t.get("setup_s"), "train_s": t.get("train_s"),
        "val_rows": t["eval_final"]["val_rows"], "val_failed_rows": t["eval_final"].get("val_failed_rows", 0),
        "val_loss_initial": t["eval_initial"]["val_loss"], "val_loss_final": t["eval_final"]["val_loss"],
        "train_loss_last": t.get("final_train_loss"), "ledger": t["ledger"],
        "checkpoint": str(out / "checkpoint.pt"), "model": str(out / "model.pt"), "metrics": str(out / "metrics.jsonl"),
    }


def evaluate_run(folder: Path, data: str, data_kwargs: Optional[dict[str, Any]] = None,
                 settings: Optional[TrainSettings] = None, progress: bool = False) -> dict[str, Any]:
    """The trained model of a ``bbzo train`` run folder on another data file (every row; uncharged queries)."""
    s = settings or Run.settings_of(folder, TASK)
    weights = Path(folder) / "model.pt"
    if not weights.exists():
        raise ConfigError(f"{folder} has no trained model (model.pt); finish the training first.")
    dev = torch.device(s.device)
    torch.manual_seed(s.seed)
    model = build_model(s.model, s.model_kwargs).to(dev)  # type: ignore[arg-type]
    state = load_weights(weights, map_location=dev, what="trained weights")
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as e:
        raise ConfigError(f"{weights} does not fit the run's model ({type(e).__name__}: {e}).") from None
    x, y = load_data(data, data_kwargs or {})
    pdtype = next((p.dtype for p in model.parameters()), torch.get_default_dtype())
    x = (x.to(pdtype) if x.is_floating_point() else x).to(dev)
    y = (y.to(pdtype) if y is not None and y.is_floating_point() else y)
    y = y.to(dev) if y is not None else None
    with build_oracle(s) as oracle:
        with oracle.ledger.evaluation():
            res = evaluate_on(model, make_objective(oracle, s.loss, _parts(s.oracle_input)), x, y, progress=progress,
                              desc=f"loss on {data}")
        rows = oracle.ledger.account(oracle).eval_rows
    return {"data": data, "data_kwargs": dict(data_kwargs or {}), "rows": res["rows"], "loss": res["loss"],
            "oracle_rows": rows, "model": str(weights)}


TASK = register_task(Task(name="train", aliases=("custom",), settings=TrainSettings, trainings=lambda s: [""], build=build,
                          evaluate=evaluate, training_files=("model.pt", "oracle.stderr.log"),
                          description="train your model through your simulator (a Python oracle or any program)"))
