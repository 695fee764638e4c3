"""The training loop: estimator -> ``param.grad`` -> any ``torch.optim`` optimizer -> scheduler.

EvoTorch's split: the objective (which queries the oracle) is the problem, the estimator forms the
gradient, the trainer runs the loop, and a :class:`~bbzo.ledger.QueryLedger` counts every query and
oracle row. Everything else (progress bar, JSONL metrics, budgets, periodic evaluation) is a listener
on the trainer's hooks:

* ``before_step``: ``fn(trainer)`` -- may call ``trainer.stop(reason)`` to end the run cleanly
* ``after_step``: ``fn(trainer, status)`` -- every step
* ``on_log``: ``fn(trainer, status)`` -- every ``log_every`` steps
* ``on_resume``: ``fn(trainer)`` -- after a checkpoint was loaded

``status`` holds ``step``, ``loss``, ``queries`` (this step), ``queries_used`` (the ledger's total),
``oracle_rows`` (if the ledger counts an oracle), ``step_time``, ``queries_per_s``, ``grad_norm``, ``lr``,
``elapsed_s`` (cumulative across resumes), what the failure policy did (``failed_rows``, ``dropped_samples``,
``penalized_rows``, under ``penalize`` / ``skip``) and whatever the estimator reports for the step (a sparsity
draw). The gradient of a step is formed by :func:`bbzo.step.estimate`, the one owner of a step; the trainer
keeps the estimator's state (a value) and checkpoints it with everything else.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .adapters import Adapter, make_adapter
from .api import write_grads
from .checkpoint import CHECKPOINT_NAME, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from .data import BatchSource
from .errors import CheckpointError, ConfigError
from .estimators.base import Estimator
from .estimators.transforms import chain, clip_by_global_norm
from .failures import FailurePolicy
from .ledger import QueryLedger
from .oracle import step_seed
from .parallel.context import is_writer
from .parallel.executor import Executor, SerialExecutor, default_executor
from .signals import deferred, hold
from .step import estimate, query_cost

__all__ = ["Trainer"]

Hook = Callable[..., Any]


class Trainer:
    """Training of the white-box ``model`` that feeds (or sits inside the loop of) a black box.

    Args:
        model: The white-box component (any ``nn.Module``; staged models get feature reuse).
        objective: Per-sample losses ``(N,)`` -- an :class:`~bbzo.objective.Objective`, a function
            ``fn(outputs, targets)`` / ``fn(outputs, inputs, targets)``, or a rollout for a
            :class:`~bbzo.adapters.LoopAdapter`. It queries the oracle.
        estimator: A registered estimator (:func:`bbzo.create_estimator`), possibly wrapped by transforms.
        optimizer: Any ``torch.optim`` optimizer over ``model``'s parameters.
        data: A :class:`~bbzo.data.BatchSource` (``get_batch(step) -> (inputs, targets)``).
        max_steps: Length of the run.
        scheduler: Optional LR scheduler, stepped once per step.
        ledger: The :class:`~bbzo.ledger.QueryLedger` that counts this run's queries (a new one if None);
            restored exactly on resume.
        oracle: An oracle to count in the ledger (the objective's oracles can also be attached directly).
        feature_reuse, n_shards: As :func:`bbzo.estimate_grad` (``n_shards``: evaluated as that many workers would).
        executor: Who evaluates each step's probes (:mod:`bbzo.parallel`). Default: the ranks of the
            process group when this process was started by ``torchrun`` / ``--workers`` (every rank runs
            the same trainer; only rank 0 writes checkpoints), else this process.
        update_bn_stats: In train mode, run one unperturbed forward per step to update BatchNorm
            running statistics (queries never do; see :mod:`bbzo.adapters.common`).
        clip_grad_norm: Clip the estimate's global norm (``chain(estimator, clip_by_global_norm(...))``).
        run_dir: Folder for ``checkpoint.pt`` (and its recovery copy ``checkpoint.prev.pt``).
        checkpoint_every: Save every N steps (0: only at the end and on failure).
        log_every: Call ``on_log`` hooks every N steps.
        adapter_kw: ``max_chunk_bytes`` / ``max_chunk``.
        adapter: Use this adapter instead of :func:`~bbzo.adapters.make_adapter`'s choice (e.g. a
            :class:`~bbzo.adapters.LoopAdapter`, whose objective is a rollout).
        failures: What to do with rows the oracle cannot answer (:class:`~bbzo.failures.FailurePolicy`;
            default: stop).
        crn_seed: Common random numbers: every oracle query of step ``t`` is handed ``step_seed(crn_seed, t)``
            (oracles that take a seed; :func:`bbzo.oracle.common_random_numbers`). None: no seed is handed on.

    Attributes:
        estimator_state: The estimator's state for the next step (a value; checkpointed).
        failure_totals: What the failure policy did over the run (checkpointed).
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Any,
        estimator: Estimator,
        optimizer: torch.optim.Optimizer,
        data: BatchSource,
        *,
        max_steps: int,
        scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
        ledger: Optional[QueryLedger] = None,
        oracle: Any = None,
        feature_reuse: Any = "auto",
        n_shards: int = 1,
        update_bn_stats: bool = True,
        clip_grad_norm: Optional[float] = None,
        run_dir: Optional[Union[str, Path]] = None,
        checkpoint_every: int = 0,
        log_every: int = 1,
        adapter_kw: Optional[dict[str, Any]] = None,
        adapter: Optional[Adapter] = None,
        failures: Optional[FailurePolicy] = None,
        executor: Optional[Executor] = None,
        crn_seed: Optional[int] = None,
    ) -> None:
        if max_steps < 0:
            raise ConfigError(f"max_steps must be >= 0, got {max_steps}.")
        if clip_grad_norm is not None:
            estimator = chain(estimator, clip_by_global_norm(clip_grad_norm))
        self.model, self.objective, self.estimator = model, objective, estimator
        self.optimizer, self.scheduler, self.data = optimizer, scheduler, data
        self.ledger = ledger if ledger is not None else QueryLedger()
        if oracle is not None and getattr(oracle, "ledger", None) is not self.ledger:
            self.ledger.attach(oracle)
        self.max_steps, self.n_shards = int(max_steps), int(n_shards)
        self.executor = executor if executor is not None else (default_executor() if n_shards == 1 else SerialExecutor(n_shards))
        self.update_bn_stats = update_bn_stats
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.checkpoint_every, self.log_every = int(checkpoint_every), max(1, int(log_every))
        if adapter is not None and adapter.model is not model:
            raise ConfigError("the adapter wraps a different model than the one the trainer trains.")
        self.adapter = adapter or make_adapter(model, feature_reuse=feature_reuse, **(adapter_kw or {}))
        self.failures = failures if failures is not None else FailurePolicy()
        self.failure_totals = {"failed_rows": 0, "dropped_samples": 0, "penalized_rows": 0}
        self.estimator_state: Any = None
        self.crn_seed = crn_seed
        self.before_step: list[Hook] = []
        self.after_step: list[Hook] = []
        self.on_log: list[Hook] = []
        self.on_resume: list[Hook] = []
        self.step_count = 0
        self.elapsed = 0.0  # seconds spent in steps (and whatever a run adds), cumulative across resumes
        self.stop_reason: Optional[str] = None
        self.status: dict[str, Any] = {}
        self._saved_step: Optional[int] = None  # the step the checkpoint on disk holds (no second identical save)
        self._has_bn = any(isinstance(m, _BatchNorm) for m in model.modules())

    # ------------------------------------------------------------------ loop
    @property
    def done(self) -> bool:
        return self.step_count >= self.max_steps

    @property
    def queries_used(self) -> int:
        """Charged queries so far (the ledger's count)."""
        return self.ledger.queries

    def stop(self, reason: str) -> None:
        """End the run before the next step (a budget listener calls this)."""
        self.stop_reason = reason

    def _state(self, params: dict[str, torch.Tensor]) -> Any:
        if self.estimator_state is None:
            self.estimator_state = self.estimator.init(params)
        return self.estimator_state

    def query_cost(self) -> int:
        """Queries the next step will cost (with the failure policy's needs)."""
        params = self.adapter.trainable()
        state = self._state(params)
        if self.estimator.needs_output_width(state):
            return self.estimator.query_cost(params, state)  # raises with a clear message unless it knows
        return query_cost(self.estimator, params, state, self.failures)

    def step(self) -> dict[str, Any]:
        """One step on the batch of the current step; returns the status dict (unchanged if stopped)."""
        rng_at_start = capture_rng()
        ledger_at_start = self.ledger.state_dict()
        t0 = time.perf_counter()
        try:
            for h in self.before_step:
                h(self)
            if self.stop_reason is not None:
                return self.status
            inputs, targets = self.data.get_batch(self.step_count)
            self.ledger.step = self.step_count + 1
            if self.update_bn_stats and self._has_bn and self.model.training and self.adapter.inputs_are_model_inputs:
                with torch.no_grad():
                    self.model(inputs)
            params = self.adapter.trainable()
            state = self._state(params)
            info = self.estimator.step_info(params, state)
            queries_before = self.ledger.queries
            res = estimate(self.adapter, self.estimator, self.objective, inputs, targets, state=state,
                           executor=self.executor, ledger=self.ledger, policy=self.failures,
                           seed=None if self.crn_seed is None else step_seed(self.crn_seed, self.step_count + 1))
        except BaseException:
            # nothing of this step was applied: save the last completed state (the ledger as it was at the
            # step's start: rows spent inside the failed step are spent again on resume), then re-raise this
            # error -- a signal arriving now (the launcher's, when a peer died) is recorded, never raised over it
            hold()
            if self.run_dir is not None and self.step_count > 0:
                with deferred():
                    self.save_checkpoint(rng=rng_at_start, ledger_state=ledger_at_start)
            raise
        finally:
            self.ledger.step = None
        with deferred():  # applied, logged and saved whole: a signal waits for the end of the step
            self._apply(res, info, queries_before, t0)
            for h in self.after_step:
                h(self, self.status)
            if self.step_count % self.log_every == 0 or self.done:
                for h in self.on_log:
                    h(self, self.status)
            if self.run_dir is not None and self.checkpoint_every and self.step_count % self.checkpoint_every == 0:
                self.save_checkpoint()
        return self.status

    def _apply(self, res: Any, info: dict[str, Any], queries_before: int, t0: float) -> None:
        """Apply a step's estimate: optimizer, scheduler, counters, status (never cut in the middle)."""
        self.estimator_state = res.state
        for k in self.failure_totals:
            self.failure_totals[k] += int(getattr(res, k))
        write_grads(self.model, res.grads)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_norm = float(torch.linalg.vector_norm(torch.stack([g.detach().double().norm() for g in grads]))) if grads else 0.0
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.step_count += 1
        dt = time.perf_counter() - t0
        self.elapsed += dt
        queries = self.ledger.queries - queries_before
        self.status = {
            "step": self.step_count,
            "loss": res.loss,
            "queries": queries,
            "queries_used": self.ledger.queries,
            "step_time": dt,
            "queries_per_s": queries / dt if dt > 0 else float("inf"),
            "grad_norm": grad_norm,
            "lr": lr,
            "elapsed_s": self.elapsed,
            **info,
        }
        if self.ledger.accounts:
            self.status["oracle_rows"] = self.ledger.rows()
        if self.failures.tolerant:
            self.status.update(failed_rows=res.failed_rows, dropped_samples=res.dropped_samples,
                               penalized_rows=res.penalized_rows)

    def run(self, steps: Optional[int] = None) -> dict[str, Any]:
        """Run ``steps`` more steps (default: until ``max_steps`` or a stop); saves a final checkpoint."""
        end = self.max_steps if steps is None else min(self.max_steps, self.step_count + steps)
        try:
            while self.step_count < end and self.stop_reason is None:
                self.step()
        except KeyboardInterrupt:  # a signal between steps (or in a hook): keep the last completed step
            if self.run_dir is not None and self.step_count > 0 and self._saved_step != self.step_count:
                with deferred():
                    self.save_checkpoint()
            raise
        if self.run_dir is not None and self.step_count > 0 and self._saved_step != self.step_count:
            with deferred():
                self.save_checkpoint()
        return self.status

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Optional[Path]:
        return None if self.run_dir is None else self.run_dir / CHECKPOINT_NAME

    def state_dict(self, rng: Optional[dict[str, Any]] = None,
                   ledger_state: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        ledger = ledger_state if ledger_state is not None else self.ledger.state_dict()
        return {
            "step": self.step_count,
            "max_steps": self.max_steps,
            "queries_used": int(ledger["queries"]),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "estimator": self.estimator.state_dict(self.estimator_state),
            "failure_totals": dict(self.failure_totals),
            "ledger": ledger,
            "elapsed": float(self.elapsed),
            "rng": rng if rng is not None else capture_rng(),
            "status": {k: v for k, v in self.status.items() if isinstance(v, (int, float, str))},
        }

    def save_checkpoint(self, path: Optional[Union[str, Path]] = None, rng: Optional[dict[str, Any]] = None,
                        ledger_state: Optional[dict[str, Any]] = None) -> Path:
        own = path is None
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            raise ConfigError("save_checkpoint needs a path or a Trainer(run_dir=...).")
        if not is_writer():  # a distributed run: every rank holds the same state, rank 0 writes it
            if own:
                self._saved_step = self.step_count
            return path
        out = save_checkpoint(path, self.state_dict(rng, ledger_state))
        if own:
            self._saved_step = self.step_count
        return out

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
        self.estimator_state = self.estimator.load_state(sd["estimator"])
        self.failure_totals.update({k: int(v) for k, v in (sd.get("failure_totals") or {}).items()})
        if sd.get("ledger") is not None:
            self.ledger.load_state_dict(sd["ledger"])
        else:  # written before the ledger existed
            self.ledger.queries = int(sd.get("queries_used", 0))
        restore_rng(sd["rng"])
        self.step_count = int(sd["step"])
        self.elapsed = float(sd.get("elapsed", 0.0))
        self.status = dict(sd.get("status") or {})

    def resume(self, path: Optional[Union[str, Path]] = None) -> "Trainer":
        """Continue exactly where the checkpoint stopped (bitwise on CPU)."""
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            raise ConfigError("resume needs a path or a Trainer(run_dir=...).")
        dev = next(self.model.parameters()).device
        sd = load_checkpoint(path, map_location=dev)
        self.load_state_dict(sd)
        self._saved_step = self.step_count
        if sd.get("max_steps") not in (None, self.max_steps):  # the run was extended (or shortened)
            self.replan_schedule()
        for h in self.on_resume:
            h(self)
        return self

    def replan_schedule(self) -> None:
        """After ``max_steps`` changed on resume (:meth:`resume` calls this): set each group's lr from the
        scheduler at the current step.

        A :class:`~torch.optim.lr_scheduler.LambdaLR` whose factor depends on the run's total length (as
        :func:`bbzo.optim.cosine_with_warmup`) is then continued over the *new* length from this step on,
        instead of applying the old schedule's last value for one step.
        """
        sched = self.scheduler
        if sched is None or not hasattr(sched, "lr_lambdas"):
            return
        for group, base, lam in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * lam(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]  # type: ignore[attr-defined]
