"""The ZO training loop: estimator -> ``param.grad`` -> any ``torch.optim`` optimizer -> scheduler.

EvoTorch's split: the oracle is queried inside ``loss_fn``, the estimator forms the gradient, the
trainer runs the loop. Everything else (progress bar, JSONL metrics, checkpoints) is a listener on
the trainer's hooks:

* ``before_step``: ``fn(trainer)``
* ``after_step``: ``fn(trainer, status)`` -- every step
* ``on_log``: ``fn(trainer, status)`` -- every ``log_every`` steps
* ``on_resume``: ``fn(trainer)`` -- after a checkpoint was loaded

``status`` holds ``step``, ``loss``, ``queries`` (this step), ``queries_used`` (total),
``oracle_rows`` (if an oracle is given), ``step_time``, ``queries_per_s``, ``grad_norm``, ``lr``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .adapters.common import Adapter, LossFn
from .adapters.staged import make_adapter
from .api import estimate, write_grads
from .checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from .data import BatchSource
from .errors import CheckpointError, ConfigError
from .estimators.base import Estimator
from .oracle import Oracle

__all__ = ["Trainer"]

Hook = Callable[..., Any]


class Trainer:
    """Zeroth-order training of the white-box ``model`` that feeds a black box.

    Args:
        model: The white-box component (any ``nn.Module``; staged models get feature reuse).
        loss_fn: ``loss_fn(outputs, targets) -> (N,)`` per-sample losses (queries the oracle).
        estimator: A registered estimator (:func:`bbzo.create_estimator`).
        optimizer: Any ``torch.optim`` optimizer over ``model``'s parameters.
        data: A :class:`~bbzo.data.BatchSource` (``get_batch(step) -> (inputs, targets)``).
        max_steps: Length of the run.
        scheduler: Optional LR scheduler, stepped once per step.
        oracle: The black box queried in ``loss_fn``; its counters go into status and checkpoints.
        feature_reuse, n_shards: As :func:`bbzo.estimate_grad`.
        update_bn_stats: In train mode, run one unperturbed forward per step to update BatchNorm
            running statistics (queries never do; see :mod:`bbzo.adapters.common`).
        clip_grad_norm: Optionally clip the estimate's global norm before the optimizer step.
        run_dir: Folder for ``checkpoint.pt`` (and whatever listeners write).
        checkpoint_every: Save every N steps (0: only at the end and on failure).
        log_every: Call ``on_log`` hooks every N steps.
        adapter_kw: ``max_chunk_bytes`` / ``max_chunk``.
        adapter: Use this adapter instead of :func:`~bbzo.adapters.make_adapter`'s choice (e.g. a
            :class:`~bbzo.adapters.LoopAdapter`, whose ``loss_fn`` is a rollout).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        estimator: Estimator,
        optimizer: torch.optim.Optimizer,
        data: BatchSource,
        *,
        max_steps: int,
        scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
        oracle: Optional[Oracle] = None,
        feature_reuse: Any = "auto",
        n_shards: int = 1,
        update_bn_stats: bool = True,
        clip_grad_norm: Optional[float] = None,
        run_dir: Optional[Union[str, Path]] = None,
        checkpoint_every: int = 0,
        log_every: int = 1,
        adapter_kw: Optional[dict[str, Any]] = None,
        adapter: Optional[Adapter] = None,
    ) -> None:
        if max_steps < 0:
            raise ConfigError(f"max_steps must be >= 0, got {max_steps}.")
        self.model, self.loss_fn, self.estimator = model, loss_fn, estimator
        self.optimizer, self.scheduler, self.data, self.oracle = optimizer, scheduler, data, oracle
        self.max_steps, self.n_shards = int(max_steps), int(n_shards)
        self.update_bn_stats, self.clip_grad_norm = update_bn_stats, clip_grad_norm
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.checkpoint_every, self.log_every = int(checkpoint_every), max(1, int(log_every))
        if adapter is not None and adapter.model is not model:
            raise ConfigError("the adapter wraps a different model than the one the trainer trains.")
        self.adapter = adapter or make_adapter(model, feature_reuse=feature_reuse, **(adapter_kw or {}))
        self.before_step: list[Hook] = []
        self.after_step: list[Hook] = []
        self.on_log: list[Hook] = []
        self.on_resume: list[Hook] = []
        self.step_count = 0
        self.queries_used = 0
        self.status: dict[str, Any] = {}
        self._has_bn = any(isinstance(m, _BatchNorm) for m in model.modules())

    # ------------------------------------------------------------------ loop
    @property
    def done(self) -> bool:
        return self.step_count >= self.max_steps

    def step(self) -> dict[str, Any]:
        """One ZO step on the batch of the current step; returns the status dict."""
        rng_at_start = capture_rng()
        oracle_at_start = self.oracle.state_dict() if self.oracle is not None else None
        try:
            for h in self.before_step:
                h(self)
            t0 = time.perf_counter()
            inputs, targets = self.data.get_batch(self.step_count)
            if self.update_bn_stats and self._has_bn and self.model.training and self.adapter.inputs_are_model_inputs:
                with torch.no_grad():
                    self.model(inputs)
            res = estimate(self.adapter, self.estimator, self.loss_fn, inputs, targets, n_shards=self.n_shards)
        except BaseException:
            # nothing of this step was applied: save the last completed state, then re-raise
            # (the oracle's counters too: rows spent inside the failed step are re-spent on resume)
            if self.run_dir is not None and self.step_count > 0:
                self.save_checkpoint(rng=rng_at_start, oracle_state=oracle_at_start)
            raise
        write_grads(self.model, res.grads)
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.detach().double().norm() for p in params]))) if params else 0.0
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.step_count += 1
        self.queries_used += res.queries
        dt = time.perf_counter() - t0
        self.status = {
            "step": self.step_count,
            "loss": res.loss,
            "queries": res.queries,
            "queries_used": self.queries_used,
            "step_time": dt,
            "queries_per_s": res.queries / dt if dt > 0 else float("inf"),
            "grad_norm": grad_norm,
            "lr": lr,
        }
        if self.oracle is not None:
            self.status["oracle_rows"] = self.oracle.rows_used
        for h in self.after_step:
            h(self, self.status)
        if self.step_count % self.log_every == 0 or self.done:
            for h in self.on_log:
                h(self, self.status)
        if self.run_dir is not None and self.checkpoint_every and self.step_count % self.checkpoint_every == 0:
            self.save_checkpoint()
        return self.status

    def run(self, steps: Optional[int] = None) -> dict[str, Any]:
        """Run ``steps`` more steps (default: until ``max_steps``); saves a final checkpoint."""
        end = self.max_steps if steps is None else min(self.max_steps, self.step_count + steps)
        while self.step_count < end:
            self.step()
        if self.run_dir is not None and self.step_count > 0:
            self.save_checkpoint()
        return self.status

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Optional[Path]:
        return None if self.run_dir is None else self.run_dir / "checkpoint.pt"

    def state_dict(self, rng: Optional[dict[str, Any]] = None,
                   oracle_state: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        return {
            "step": self.step_count,
            "queries_used": self.queries_used,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "estimator": self.estimator.state_dict(),
            "oracle": oracle_state if oracle_state is not None else (
                self.oracle.state_dict() if self.oracle is not None else None),
            "rng": rng if rng is not None else capture_rng(),
            "status": {k: v for k, v in self.status.items() if isinstance(v, (int, float, str))},
        }

    def save_checkpoint(self, path: Optional[Union[str, Path]] = None, rng: Optional[dict[str, Any]] = None,
                        oracle_state: Optional[dict[str, Any]] = None) -> Path:
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            raise ConfigError("save_checkpoint needs a path or a Trainer(run_dir=...).")
        return save_checkpoint(path, self.state_dict(rng, oracle_state))

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(sd["model"])
            self.optimizer.load_state_dict(sd["optimizer"])
            if self.scheduler is not None:
                if sd["scheduler"] is None:
                    raise CheckpointError("checkpoint has no scheduler state but this run uses a scheduler.")
                self.scheduler.load_state_dict(sd["scheduler"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(
                f"checkpoint does not match this run ({type(e).__name__}: {str(e)[:300]}). Resume with the "
                "same model, optimizer and scheduler settings it was written with."
            ) from e
        self.estimator.load_state_dict(sd["estimator"])
        if self.oracle is not None and sd.get("oracle") is not None:
            self.oracle.load_state_dict(sd["oracle"])
        restore_rng(sd["rng"])
        self.step_count = int(sd["step"])
        self.queries_used = int(sd["queries_used"])
        self.status = dict(sd.get("status") or {})

    def resume(self, path: Optional[Union[str, Path]] = None) -> "Trainer":
        """Continue exactly where the checkpoint stopped (bitwise on CPU)."""
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            raise ConfigError("resume needs a path or a Trainer(run_dir=...).")
        dev = next(self.model.parameters()).device
        self.load_state_dict(load_checkpoint(path, map_location=dev))
        for h in self.on_resume:
            h(self)
        return self
