"""Train your own model through your own simulator: the task behind ``bbzo train``.

Everything is named by the user: the oracle (a Python :class:`~bbzo.oracle.Oracle`, class or batched
function by reference, or an external program speaking the bbzo protocol), the model (a reference to a
callable returning an ``nn.Module``, or a registered model name), the data (an ``.npz``/``.pt`` file or
a reference to a callable). This module wires them into the engine's :class:`~bbzo.trainer.Trainer`:

    data batch x --model--> outputs --(+ x, y as --oracle-input says)--> oracle --> answers --loss--> (B,) losses

:func:`build_run` returns a :class:`TrainRun` (model, oracle, estimator, trainer) that callers may
extend with hooks before :meth:`TrainRun.execute`. The query budget (``max_queries``) counts bbzo
*queries*, as everywhere in bbzo: one loss evaluation of one parameter set on the minibatch, i.e.
``batch`` oracle rows. The run stops cleanly before the step that would exceed it (checkpoint saved,
``stopped_by: max_queries`` in ``results.json``); as a second guard the oracle gets a hard row budget of
``max_queries * batch``.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

import bbzo
from bbzo.config import write_config
from bbzo.data import TensorBatches
from bbzo.errors import BbzoError, ConfigError, OracleError, ShapeError
from bbzo.logging import JSONLLogger, ProgressBar
from bbzo.optim import cosine_with_warmup, make_optimizer
from bbzo.oracle import FunctionOracle, Oracle
from bbzo.reference import _where, is_reference, load_object
from bbzo.trainer import Trainer

__all__ = ["TrainConfig", "TrainRun", "build_run", "run_training", "load_data", "build_model", "build_oracle",
           "LOSSES", "ORACLE_INPUT_PARTS"]

LOSSES = ("mse", "oracle")
ORACLE_INPUT_PARTS = ("outputs", "inputs", "targets")


@dataclass
class TrainConfig:
    """The options of ``bbzo train`` (the CLI's help text documents each one)."""

    model: Optional[str] = None
    data: Optional[str] = None
    oracle: Optional[str] = None
    oracle_cmd: Optional[list[str]] = None
    oracle_kwargs: dict[str, Any] = field(default_factory=dict)
    oracle_array: str = "numpy"
    oracle_input: str = "outputs"
    oracle_timeout: float = 60.0
    oracle_restarts: int = 0
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data_kwargs: dict[str, Any] = field(default_factory=dict)
    val_fraction: float = 0.1
    loss: str = "mse"
    estimator: str = "cge"
    estimator_kwargs: dict[str, Any] = field(default_factory=dict)
    lpr: Optional[str] = None
    resample_every: int = 0
    sparse_others: str = "dense"
    mu: float = 5e-3
    q: Optional[int] = None
    lr: float = 0.01
    optimizer: str = "adam"
    schedule: str = "cosine"
    steps: int = 200
    batch: int = 32
    seed: int = 0
    device: str = "cpu"
    max_queries: Optional[int] = None
    out: Path = Path("runs/train")
    resume: bool = False
    overwrite: bool = False
    checkpoint_every: int = 50
    log_every: int = 1
    no_progress: bool = False


# ---------------------------------------------------------------------------- pieces
def _to_tensor(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(np.asarray(x))
    except Exception as e:
        raise ConfigError(f"data: {what} cannot be turned into a tensor ({type(x).__name__}: {e}).") from e


def _split_pair(obj: Any, source: str) -> tuple[Any, Any]:
    if isinstance(obj, dict) or hasattr(obj, "files"):  # dict, np.load's NpzFile
        keys = list(obj.keys()) if isinstance(obj, dict) else list(obj.files)
        if "inputs" not in keys:
            raise ConfigError(f"data {source}: needs an 'inputs' array (and 'targets' unless --loss oracle); it "
                              f"holds {', '.join(map(str, keys)) or 'nothing'}.")
        return obj["inputs"], (obj["targets"] if "targets" in keys else None)
    if isinstance(obj, (tuple, list)) and len(obj) in (1, 2):
        return obj[0], (obj[1] if len(obj) == 2 else None)
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return obj, None
    raise ConfigError(f"data {source}: expected (inputs, targets), a dict with 'inputs'/'targets', or an array; "
                      f"got {type(obj).__name__}.")


def load_data(spec: str, kwargs: Optional[dict[str, Any]] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(inputs, targets)`` from an ``.npz`` / ``.pt`` / ``.npy`` file or a ``module:callable`` reference."""
    kwargs = kwargs or {}
    path = Path(spec)
    if path.is_file():
        if kwargs:
            raise ConfigError("--data-kwargs only applies when --data names a callable (module:function).")
        suffix = path.suffix.lower()
        try:
            if suffix == ".npz":
                with np.load(path, allow_pickle=False) as z:
                    x, y = _split_pair(z, str(path))
                    x, y = np.array(x), (np.array(y) if y is not None else None)
            elif suffix == ".npy":
                x, y = np.load(path, allow_pickle=False), None
            elif suffix in (".pt", ".pth"):
                x, y = _split_pair(torch.load(path, map_location="cpu", weights_only=True), str(path))
            else:
                raise ConfigError(f"data file {str(path)!r}: unknown type {suffix!r}; use .npz (arrays 'inputs' and "
                                  "'targets'), .pt (a dict of tensors) or a module:callable reference.")
        except (BbzoError, ConfigError):
            raise
        except Exception as e:
            raise ConfigError(f"data file {str(path)!r} cannot be read ({type(e).__name__}: {str(e)[:200]}).") from e
        source = str(path)
    elif is_reference(spec) and not spec.endswith((".npz", ".pt", ".pth", ".npy")):
        fn = load_object(spec)
        if not callable(fn):
            x, y = _split_pair(fn, spec)
        else:
            _check_kwargs(fn, kwargs, f"data {spec!r}")
            try:
                x, y = _split_pair(fn(**kwargs), spec)
            except BbzoError:
                raise
            except Exception as e:
                raise ConfigError(f"data {spec!r} raised {type(e).__name__}{_where(e)}: {e}") from e
        source = spec
    else:
        raise ConfigError(f"data file {spec!r} not found. --data takes an .npz file with arrays 'inputs' and "
                          "'targets', a .pt file, or a reference 'module:function' / 'file.py:function' that "
                          "returns (inputs, targets).")
    x = _to_tensor(x, "inputs")
    y = _to_tensor(y, "targets") if y is not None else None
    if x.dim() == 0 or x.shape[0] == 0:
        raise ShapeError(f"data {source}: inputs must have a batch dimension with at least one row, got shape {tuple(x.shape)}.")
    if y is not None and (y.dim() == 0 or y.shape[0] != x.shape[0]):
        raise ShapeError(f"data {source}: {x.shape[0]} input rows but targets of shape {tuple(y.shape)}.")
    return x, y


def _check_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any], what: str) -> None:
    try:
        inspect.signature(fn).bind_partial(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{what}: {e}. Signature: {getattr(fn, '__name__', what)}{inspect.signature(fn)}") from None
    except ValueError:  # no signature (builtins)
        pass


def build_model(spec: str, kwargs: Optional[dict[str, Any]] = None) -> nn.Module:
    """A registered model name (``bbzo models``) or a reference to an ``nn.Module`` / a callable returning one."""
    kwargs = kwargs or {}
    if not is_reference(spec):
        from bbzo.models import create_model, list_models
        if spec not in list_models():
            raise ConfigError(f"--model {spec!r} is neither a registered model ({', '.join(list_models())}) nor a "
                              "reference 'module:callable' / 'file.py:callable' returning an nn.Module.")
        return create_model(spec, **kwargs)
    obj = load_object(spec)
    if isinstance(obj, nn.Module):
        if kwargs:
            raise ConfigError(f"--model {spec!r} is a module instance; --model-kwargs need a callable.")
        return obj
    if not callable(obj):
        raise ConfigError(f"--model {spec!r} is a {type(obj).__name__}; it must be an nn.Module or a callable returning one.")
    _check_kwargs(obj, kwargs, f"model {spec!r}")
    model = _call_user(obj, kwargs, f"model {spec!r}")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {spec!r} returned {type(model).__name__}; it must return an nn.Module.")
    return model


def _call_user(fn: Any, kwargs: dict[str, Any], what: str, when: str = "") -> Any:
    """Call a user's builder; its own exceptions become one clear :class:`ConfigError` (bbzo's pass through)."""
    try:
        return fn(**kwargs)
    except BbzoError:
        raise
    except Exception as e:
        raise ConfigError(f"{what} raised {type(e).__name__}{_where(e)}{when}: {e}") from e


class _GuardedOracle(Oracle):
    """Turns exceptions of user Python code into an :class:`OracleError` (one line in the CLI, with where)."""

    def __init__(self, inner: Oracle) -> None:
        super().__init__(name=inner.name)
        self.inner = inner
        self.input_shape, self.output_shape = inner.input_shape, inner.output_shape

    def _query(self, inputs: torch.Tensor) -> torch.Tensor:
        try:
            return self.inner.query(inputs)
        except BbzoError:
            raise
        except Exception as e:
            raise OracleError(f"oracle {self.name}, query #{self.calls_used + 1} ({inputs.shape[0]} rows) raised "
                              f"{type(e).__name__}{_where(e)}: {e}") from e


def build_oracle(cfg: TrainConfig, run_dir: Optional[Path] = None) -> Oracle:
    """The black box: ``cfg.oracle_cmd`` (an external program) or ``cfg.oracle`` (Python, by reference)."""
    if bool(cfg.oracle) == bool(cfg.oracle_cmd):
        raise ConfigError("name the black box once: --oracle REF (Python) or --oracle-cmd 'program args' (an "
                          "external program speaking the bbzo protocol)." if cfg.oracle else
                          "no black box given: pass --oracle REF (a Python oracle) or --oracle-cmd 'program args'.")
    if cfg.oracle_cmd:
        from bbzo.oracles.process import ProcessOracle
        if cfg.oracle_kwargs:
            raise ConfigError("--oracle-kwargs apply to a Python --oracle, not to --oracle-cmd (pass program arguments "
                              "in the command).")
        return ProcessOracle(cfg.oracle_cmd, timeout=cfg.oracle_timeout, restarts=cfg.oracle_restarts,
                             stderr_log=(run_dir / "oracle.stderr.log") if run_dir is not None else None)
    assert cfg.oracle is not None
    obj = load_object(cfg.oracle)
    kwargs = dict(cfg.oracle_kwargs)
    if cfg.oracle_array not in ("numpy", "torch"):
        raise ConfigError(f"--oracle-array must be numpy or torch, got {cfg.oracle_array!r}.")
    numpy = cfg.oracle_array == "numpy"
    if isinstance(obj, Oracle):
        if kwargs:
            raise ConfigError(f"--oracle {cfg.oracle!r} is an Oracle instance; --oracle-kwargs need a class or function.")
        return _GuardedOracle(obj)
    if inspect.isclass(obj):
        _check_kwargs(obj, kwargs, f"oracle {cfg.oracle!r}")
        inst = _call_user(obj, kwargs, f"oracle {cfg.oracle!r}", " when built")
        if isinstance(inst, Oracle):
            return _GuardedOracle(inst)
        if not callable(inst):
            raise ConfigError(f"oracle {cfg.oracle!r}: an instance of {obj.__name__} is neither an Oracle nor callable.")
        return _GuardedOracle(FunctionOracle(inst, numpy=numpy, name=cfg.oracle))
    if callable(obj):
        _check_kwargs(obj, kwargs, f"oracle {cfg.oracle!r}")
        fn = functools.partial(obj, **kwargs) if kwargs else obj
        return _GuardedOracle(FunctionOracle(fn, numpy=numpy, name=cfg.oracle))
    raise ConfigError(f"--oracle {cfg.oracle!r} is a {type(obj).__name__}; it must be an Oracle (instance or "
                      "subclass) or a batched function inputs -> outputs.")


def _parts(spec: str) -> list[str]:
    parts = [p.strip() for p in spec.replace(",", "+").split("+") if p.strip()]
    bad = [p for p in parts if p not in ORACLE_INPUT_PARTS]
    if bad or "outputs" not in parts or len(set(parts)) != len(parts):
        raise ConfigError(f"--oracle-input {spec!r}: join distinct parts of {', '.join(ORACLE_INPUT_PARTS)} with '+', "
                          "and include outputs (the model must feed the oracle), e.g. 'outputs' or 'outputs+inputs'.")
    return parts


class _Batches:
    """A batch source whose targets carry what the loss needs: ``{"x": inputs, "y": targets}``."""

    def __init__(self, base: TensorBatches) -> None:
        self.base = base

    def get_batch(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = self.base.get_batch(step)
        return x, ({"x": x} if y is None else {"x": x, "y": y})


def make_loss(oracle: Oracle, loss: str, parts: list[str]) -> Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]:
    """``loss_fn(outputs, {"x", "y"}) -> (N,)``: assemble oracle rows, query once, turn answers into losses."""
    custom = None
    if loss not in LOSSES:
        if not is_reference(loss):
            raise ConfigError(f"--loss {loss!r}: use mse, oracle, or a reference 'module:function' to "
                              "fn(oracle_outputs, targets) -> (N,) per-sample losses.")
        custom = load_object(loss)
        if not callable(custom):
            raise ConfigError(f"--loss {loss!r} is not callable.")

    def loss_fn(outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        n = outputs.shape[0]
        src = {"outputs": outputs, "inputs": batch["x"], "targets": batch.get("y")}
        if "targets" in parts and src["targets"] is None:
            raise ConfigError("--oracle-input includes targets but the data have none.")
        rows = torch.cat([src[p].reshape(n, -1).to(outputs.dtype) for p in parts], dim=1)  # type: ignore[union-attr]
        ans = oracle.query(rows)
        if custom is not None:
            y = batch.get("y")
            try:
                out = custom(ans, y)
            except BbzoError:
                raise
            except Exception as e:
                raise ConfigError(f"--loss {loss!r} raised {type(e).__name__}{_where(e)}: {e}") from e
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
        y = batch.get("y")
        if y is None:
            raise ConfigError("--loss mse needs targets: the data have only inputs (use --loss oracle if the oracle "
                              "returns the loss itself).")
        y = y.reshape(n, -1).to(flat.dtype)
        if y.shape[1] != flat.shape[1]:
            raise ShapeError(f"--loss mse: the oracle returns {flat.shape[1]} values per row but the targets have "
                             f"{y.shape[1]}.")
        return (flat - y).pow(2).mean(dim=1)

    return loss_fn


def _make_estimator(cfg: TrainConfig) -> Any:
    kw = dict(cfg.estimator_kwargs)
    kw.setdefault("mu", cfg.mu)
    if cfg.estimator == "rge":
        if cfg.q is not None:
            kw.setdefault("q", cfg.q)
        kw.setdefault("seed", cfg.seed)
    elif cfg.q is not None:
        raise ConfigError(f"--q sets the directions of rge; it does not apply to --estimator {cfg.estimator}.")
    return bbzo.create_estimator(cfg.estimator, **kw)


# ---------------------------------------------------------------------------- the run
def _close(oracle: Oracle) -> None:
    """Stop an external program (or whatever a user oracle holds open) when the run ends, however it ends."""
    for o in (oracle, getattr(oracle, "inner", None)):
        close = getattr(o, "close", None)
        if callable(close):
            close()

class _uncounted:
    """Evaluation queries do not count against the training budget or the step counters."""

    def __init__(self, oracle: Oracle) -> None:
        self.oracle = oracle

    def __enter__(self) -> None:
        self.saved = (self.oracle.rows_used, self.oracle.calls_used, self.oracle.max_rows, self.oracle.max_calls)
        self.oracle.max_rows = self.oracle.max_calls = None

    def __exit__(self, *exc: Any) -> None:
        o = self.oracle
        o.rows_used, o.calls_used, o.max_rows, o.max_calls = self.saved


@dataclass
class TrainRun:
    """Everything :func:`build_run` wired; attach hooks to ``trainer`` before :meth:`execute`."""

    cfg: TrainConfig
    model: nn.Module
    oracle: Oracle
    estimator: Any
    trainer: Trainer
    loss_fn: Callable[..., torch.Tensor]
    val: tuple[torch.Tensor, dict[str, torch.Tensor]]
    progress: ProgressBar
    queries_per_step: int
    initial_eval: dict[str, float]
    resumed_from_step: int = 0

    @torch.no_grad()
    def evaluate(self, chunk: int = 1024) -> dict[str, float]:
        """Mean loss of the current model on the validation rows (queries not counted in the budget)."""
        was_training = self.model.training
        self.model.eval()
        x, t = self.val
        total, n = 0.0, x.shape[0]
        with _uncounted(self.oracle):
            for i in range(0, n, chunk):
                sl = {k: v[i:i + chunk] for k, v in t.items()}
                total += float(self.loss_fn(self.model(x[i:i + chunk]), sl).double().sum())
        self.model.train(was_training)
        return {"loss": total / n, "rows": n}

    def _budget_allows_next_step(self) -> bool:
        if self.cfg.max_queries is None:
            return True
        params = {k: p.detach() for k, p in self.model.named_parameters() if p.requires_grad}
        return self.trainer.queries_used + self.estimator.query_cost(params) <= self.cfg.max_queries

    def execute(self) -> dict[str, Any]:
        """Train until ``steps`` or the query budget; write ``model.pt`` and ``results.json``; close the oracle."""
        cfg, trainer, out = self.cfg, self.trainer, Path(self.cfg.out)
        stopped_by = "steps"
        t0 = time.perf_counter()
        try:
            while not trainer.done:
                if not self._budget_allows_next_step():
                    stopped_by = "max_queries"
                    break
                try:
                    trainer.step()
                except BbzoError as e:
                    if trainer.step_count > 0:
                        saved = (f" The last completed step ({trainer.step_count}) is saved in {trainer.checkpoint_path}; "
                                 "fix the cause and rerun with --resume to continue.")
                    else:
                        saved = " No step had completed; nothing was saved."
                    raise type(e)(f"{e}.{saved}" if not str(e).endswith(".") else f"{e}{saved}") from e
            wall = time.perf_counter() - t0
            if trainer.step_count > 0:
                trainer.save_checkpoint()
            self.progress.close()
            final = self.evaluate()
        finally:
            self.progress.close()
            _close(self.oracle)
        torch.save(self.model.state_dict(), out / "model.pt")
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        results = {
            "steps": trainer.step_count,
            "stopped_by": stopped_by,
            "resumed_from_step": self.resumed_from_step,
            "params": n_params,
            "queries_per_step": self.queries_per_step,
            "queries_used": trainer.queries_used,
            "max_queries": cfg.max_queries,
            "oracle_rows": self.oracle.rows_used,
            "oracle_restarts": getattr(self.oracle, "restarts_used", 0),
            "wall_s": round(wall, 2),
            "val_rows": final["rows"],
            "val_loss_initial": self.initial_eval["loss"],
            "val_loss_final": final["loss"],
            "train_loss_last": trainer.status.get("loss"),
            "checkpoint": str(trainer.checkpoint_path),
            "model": str(out / "model.pt"),
            "metrics": str(out / "metrics.jsonl"),
        }
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        return results


def build_run(cfg: TrainConfig, resolved: Optional[dict[str, Any]] = None,
              sources: Optional[dict[str, str]] = None) -> TrainRun:
    """Check the options, load data and model, start the oracle, build the trainer (resumed if asked)."""
    if not cfg.model:
        raise ConfigError("--model is required: a registered name (bbzo models) or 'module:callable' returning an nn.Module.")
    if not cfg.data:
        raise ConfigError("--data is required: an .npz file with 'inputs' and 'targets', or 'module:callable'.")
    for name, lo in (("steps", 0), ("batch", 1), ("checkpoint_every", 0), ("log_every", 1), ("oracle_restarts", 0)):
        if getattr(cfg, name) < lo:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(cfg, name)}.")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}.")
    if cfg.max_queries is not None and cfg.max_queries < 1:
        raise ConfigError(f"--max-queries must be >= 1, got {cfg.max_queries}.")
    if cfg.schedule not in ("cosine", "constant"):
        raise ConfigError(f"--schedule must be cosine or constant, got {cfg.schedule!r}.")
    parts = _parts(cfg.oracle_input)
    out = Path(cfg.out)
    ckpt = out / "checkpoint.pt"
    resuming = cfg.resume and ckpt.exists()
    if ckpt.exists() and not cfg.resume and not cfg.overwrite:
        raise ConfigError(f"{out} already holds a run (checkpoint.pt). Pass --resume to continue it, --overwrite to "
                          "start over, or another --out.")
    out.mkdir(parents=True, exist_ok=True)
    if not resuming:
        for stale in ("checkpoint.pt", "metrics.jsonl", "results.json", "model.pt", "oracle.stderr.log"):
            (out / stale).unlink(missing_ok=True)
    if resolved is not None:
        write_config(out, resolved, sources, header="bbzo train: the options this run used\n"
                     f"re-run: bbzo train --config {out / 'config.resolved.yaml'}")
    dev = torch.device(cfg.device)

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    x, y = load_data(cfg.data, cfg.data_kwargs)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.model_kwargs).to(dev)
    pdtype = next((p.dtype for p in model.parameters()), torch.get_default_dtype())
    x = x.to(pdtype) if x.is_floating_point() else x
    y = y.to(pdtype) if y is not None and y.is_floating_point() else y

    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(x.shape[0], generator=g)
    n_val = math.floor(cfg.val_fraction * x.shape[0])
    tr, va = (perm[n_val:], perm[:n_val]) if n_val > 0 else (perm, perm)
    if cfg.batch > tr.numel():
        raise ConfigError(f"--batch {cfg.batch} is larger than the {tr.numel()} training rows.")
    batches = _Batches(TensorBatches(x[tr], y[tr] if y is not None else None, cfg.batch, seed=cfg.seed, device=dev))
    val_t = {"x": x[va].to(dev)} if y is None else {"x": x[va].to(dev), "y": y[va].to(dev)}

    oracle = build_oracle(cfg, out)
    try:
        loss_fn = make_loss(oracle, cfg.loss, parts)
        # one unperturbed forward (eval mode: BN statistics untouched): does the oracle take rows this wide?
        with torch.no_grad():
            xb, tb = batches.get_batch(0)
            was_training = model.training
            probe_out = model.eval()(xb[:1])
            model.train(was_training)
        src = {"outputs": probe_out, "inputs": xb[:1], "targets": tb.get("y")}
        if src["targets"] is None and "targets" in parts:
            raise ConfigError("--oracle-input includes targets but the data have none.")
        width = sum(int(src[p].reshape(1, -1).shape[1]) for p in parts)  # type: ignore[union-attr]
        if oracle.input_shape is not None and (width,) != tuple(oracle.input_shape):
            raise ConfigError(f"the oracle {oracle.name!r} takes rows of {tuple(oracle.input_shape)} values, but "
                              f"--oracle-input {cfg.oracle_input} gives {width} per row (model outputs "
                              f"{tuple(probe_out.shape[1:])}). Change the model or --oracle-input.")
        if cfg.max_queries is not None:
            cap = cfg.max_queries * cfg.batch
            oracle.max_rows = cap if oracle.max_rows is None else min(oracle.max_rows, cap)
        est = _make_estimator(cfg)
        params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
        sampler = None
        if cfg.lpr:
            from bbzo.sparsity import DynamicSparsity, LayerRatios

            if cfg.estimator != "sparse_cge":
                raise ConfigError(f"--lpr trains with a sparse gradient: use --estimator sparse_cge "
                                  f"(got {cfg.estimator}).")
            sampler = DynamicSparsity(LayerRatios.load(cfg.lpr), params, resample_every=cfg.resample_every,
                                      seed=cfg.seed, others=cfg.sparse_others)
            est.set_coords(params, sampler.coords(0))
        q_step = est.query_cost(params)
        if cfg.estimator == "sparse_cge" and q_step <= 1:
            raise ConfigError("sparse_cge has no coordinates to estimate: give a set with --estimator-kwargs "
                              "'{coords: {\"0.weight\": [0, 1, 2]}}' or '{dense: [\"*\"]}'.")
        if cfg.max_queries is not None and q_step > cfg.max_queries and not resuming:
            raise ConfigError(f"--max-queries {cfg.max_queries} is less than one step ({q_step} queries with "
                              f"{cfg.estimator} on {sum(p.numel() for p in params.values())} parameters).")
        opt = make_optimizer(model.parameters(), cfg.optimizer, lr=cfg.lr)
        sched = cosine_with_warmup(opt, max(1, cfg.steps), warmup_steps=max(1, cfg.steps) // 20) \
            if cfg.schedule == "cosine" else None
        trainer = Trainer(model, loss_fn, est, opt, batches, max_steps=cfg.steps, scheduler=sched, oracle=oracle,
                          run_dir=out, checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every)
        if sampler is not None:
            sampler.attach(trainer)
        JSONLLogger(out / "metrics.jsonl", extra={"estimator": cfg.estimator}).attach(trainer)
        bar = ProgressBar(desc=f"{cfg.estimator} ({q_step} q/step)", disable=cfg.no_progress).attach(trainer)
        run = TrainRun(cfg, model, oracle, est, trainer, loss_fn, (val_t["x"], val_t), bar, q_step, {})
        run.initial_eval = run.evaluate()  # the freshly built model: also on resume
        if resuming:
            trainer.resume()
            run.resumed_from_step = trainer.step_count
        return run
    except BaseException:
        _close(oracle)
        raise


def run_training(cfg: TrainConfig, resolved: Optional[dict[str, Any]] = None,
                 sources: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """:func:`build_run` then :meth:`TrainRun.execute`; returns the ``results.json`` dict."""
    return build_run(cfg, resolved, sources).execute()

