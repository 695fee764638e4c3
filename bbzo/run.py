"""One run folder, one lifecycle, for every task.

:class:`Run` owns a run folder and enforces the rules a user can count on:

* **One folder, one setting.** A folder that holds a run with other settings is refused, naming the
  differing settings (``lr: 0.05 -> 0.5``) and those allowed to change (declared ``runtime``);
  ``--overwrite`` starts over. Runtime settings changed on ``--resume`` are applied and recorded in
  ``run.json``'s history; no setting is silently ignored.
* **Resume is exact.** ``--resume`` continues every training from its checkpoint (bitwise on CPU);
  ``--resume`` on a folder without a checkpoint says so instead of starting afresh. Extending a run
  (``--resume --steps N``) re-plans a length-dependent schedule over the new length from the resume
  step on (:meth:`bbzo.trainer.Trainer.resume` re-plans when the checkpoint's length differs). A run whose query budget is spent says to
  raise ``--max-queries``.
* **Nothing is lost.** Checkpoints are atomic and the previous one is kept as a recovery copy; a failed
  run still writes ``results.json`` with its status, the error and how far each training got; wall time
  is cumulative across resumes. An invocation that trains no step (a set-up error, a refused ``--resume``)
  leaves the folder as it found it: no claim on a new folder, nothing overwritten in an old one.
* **One run per folder.** ``run.lock`` is held for the run's life (:mod:`bbzo.runlock`); a second command on
  the same ``--out`` is refused with the holder's PID and command.
* **Signals save.** SIGTERM and Ctrl-C abandon the step in progress; the last completed step is in the
  checkpoint, ``results.json`` says ``interrupted``, and one line names the step saved and the command that
  continues the run (:mod:`bbzo.signals`).
* **Ranks agree.** Before the first step every rank of a distributed run compares its fingerprint (settings,
  data, checkpoint step and weights, versions) with rank 0's; any difference stops every rank with one line.
* **Every run shows itself.** A progress bar, ``metrics.jsonl`` per training, ``loss.png`` (training loss
  against steps and against queries), ``results.json`` and the task's ``results.md`` table.

:func:`run_task` runs a registered :class:`~bbzo.task.Task` through all of it.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .checkpoint import CHECKPOINT_NAME, atomic_write_bytes, load_checkpoint, previous_path
from .config import RESOLVED_NAME, as_plain, differing, from_plain, runtime_keys, write_config
from .data import BatchSource
from .errors import BbzoError, ConfigError, WorkerError
from .jsonio import write_json
from .runlock import RunLock
from .signals import SIGNAL_NAMES, Interrupted, hold as hold_signals, install as install_signals
from .estimators.base import Estimator
from .ledger import QueryLedger
from . import parallel
from .listeners import BudgetGuard, JSONLLogger, PeriodicEval, ProgressBar, plot_losses, read_jsonl
from .provenance import provenance
from .task import Task
from .trainer import Trainer

__all__ = ["Run", "Training", "BuildContext", "run_task", "RUN_FILE"]

RUN_FILE = "run.json"
RUN_FORMAT = "bbzo-run/1"
TRAINING_FILES = ("checkpoint.pt", "checkpoint.prev.pt", "metrics.jsonl", "train.json")
RUN_OUTPUTS = ("results.json", "results.md", "loss.png")


@dataclass
class Training:
    """What a task builds for one training: the trainer's parts, and how to report on it.

    Attributes:
        model, objective, estimator, optimizer, data, steps, scheduler, adapter: As :class:`~bbzo.trainer.Trainer`.
        oracles: Black boxes to count in the training's ledger (and to close at the end).
        evaluate: ``evaluate(model) -> {name: number}``, run before and after training (and every
            ``eval_every`` steps) in the ledger's uncharged evaluation scope.
        weights: File name of the final weights in the training folder.
        desc: Progress-bar label.
        log_extra: Constant fields of every ``metrics.jsonl`` row (e.g. ``{"method": "zo"}``).
        summary: ``summary(trainer) -> dict`` merged into ``train.json`` (task-specific numbers).
        trainer_kw: More :class:`~bbzo.trainer.Trainer` arguments (``update_bn_stats``, ``n_shards``...).
    """

    model: nn.Module
    objective: Any
    estimator: Estimator
    optimizer: torch.optim.Optimizer
    data: BatchSource
    steps: int
    scheduler: Any = None
    adapter: Any = None
    oracles: Sequence[Any] = ()
    evaluate: Optional[Callable[[nn.Module], dict[str, Any]]] = None
    eval_every: int = 0
    checkpoint_every: int = 0
    log_every: int = 1
    weights: str = "model.pt"
    desc: str = ""
    log_extra: dict[str, Any] = field(default_factory=dict)
    summary: Optional[Callable[[Trainer], dict[str, Any]]] = None
    trainer_kw: dict[str, Any] = field(default_factory=dict)


@dataclass
class BuildContext:
    """What a task's ``build`` gets besides its settings.

    Attributes:
        run: The :class:`Run`. ``run.shared`` holds what the task's ``prepare`` returned.
        name: The training's name; ``folder`` its folder.
        resuming: Whether the training continues from a checkpoint (reuse saved setup, e.g. an LPR file).
        ledger: The training's :class:`~bbzo.ledger.QueryLedger`: attach oracles, charge setup queries.
    """

    run: "Run"
    name: str
    folder: Path
    resuming: bool
    ledger: QueryLedger

    @property
    def shared(self) -> Any:
        return self.run.shared


def _write_json(path: Path, data: Any) -> None:
    if not parallel.is_writer():  # a distributed run: rank 0 writes
        return
    write_json(path, data)


def _step_seconds(folder: Path, trainer: Trainer, setup_s: float) -> float:
    """Seconds spent in training steps alone, over every invocation of the run: the sum of ``step_time`` in
    ``metrics.jsonl`` when it holds every step, else the trainer's elapsed time less this invocation's set-up
    (``wall_s`` counts set-up too: data, model, a score's queries)."""
    path = folder / "metrics.jsonl"
    if path.exists():
        rows = read_jsonl(path)
        if len(rows) == trainer.step_count and all(isinstance(r.get("step_time"), (int, float)) for r in rows):
            return float(sum(r["step_time"] for r in rows))
    return max(0.0, trainer.elapsed - setup_s)


def _describe_change(key: str, old: Any, new: Any) -> str:
    return f"{key} ({old!r} -> {new!r})"


class Run:
    """A run folder and its lifecycle (see the module docstring).

    Args:
        folder: The run folder.
        task: The :class:`~bbzo.task.Task` it runs.
        settings: The task's settings (a dataclass instance); ``sources``: where each value came from.
        resume, overwrite, progress, plots: As the flags of the same names.
        command: The command line, recorded in ``run.json`` and the resolved config's header.
    """

    def __init__(self, folder: Path, task: Task, settings: Any, sources: Optional[dict[str, str]] = None, *,
                 resume: bool = False, overwrite: bool = False, progress: bool = True, plots: bool = True,
                 command: Optional[str] = None) -> None:
        self.folder = Path(folder)
        self.task, self.settings = task, settings
        self.sources = dict(sources or {})
        self.resume, self.overwrite, self.progress, self.plots = resume, overwrite, progress, plots
        self.command = command or " ".join(["bbzo", *sys.argv[1:]])
        self.previous: Optional[dict[str, Any]] = None  # the settings the folder held before this invocation
        self.shared: Any = None
        self.summaries: dict[str, dict[str, Any]] = {}
        self.single = False
        self.started = time.perf_counter()
        self.progressed = False  # whether this invocation completed a training step
        self._before: dict[str, Optional[bytes]] = {}  # run-level files as they were before this invocation
        self.lock = RunLock(self.folder, self.command)

    # ------------------------------------------------------------------ folder policy
    def training_folder(self, name: str) -> Path:
        return self.folder / name if name else self.folder

    def _has_checkpoint(self, name: str) -> bool:
        ck = self.training_folder(name) / CHECKPOINT_NAME
        return ck.exists() or previous_path(ck).exists()

    def _read_record(self) -> Optional[dict[str, Any]]:
        path = self.folder / RUN_FILE
        if not path.exists():
            return None
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path} is unreadable ({type(e).__name__}); delete it or use --overwrite.") from None
        if not isinstance(rec, dict) or rec.get("format") != RUN_FORMAT:
            raise ConfigError(f"{path} is not a bbzo run record; use another --out or --overwrite.")
        return rec

    def _wipe(self, record: Optional[dict[str, Any]], names: Sequence[str]) -> None:
        if not parallel.is_writer():
            return
        old = list((record or {}).get("trainings", [])) + list(names)
        for n in set(old):
            folder = self.training_folder(n)
            if n and folder.is_dir():
                shutil.rmtree(folder)
            elif not n:
                self._clean_training(folder)
        for f in (*RUN_OUTPUTS, RUN_FILE, RESOLVED_NAME):
            (self.folder / f).unlink(missing_ok=True)

    def _clean_training(self, folder: Path) -> None:
        if not parallel.is_writer():
            return
        for f in (*TRAINING_FILES, *self.task.training_files):
            (folder / f).unlink(missing_ok=True)

    def open(self, trainings: Sequence[str]) -> "Run":
        """Apply the folder policy for these trainings, then record the settings (run.json, resolved config)."""
        cls = type(self.settings)
        self.single = list(trainings) == [""]
        self.folder.mkdir(parents=True, exist_ok=True)
        if parallel.is_writer():
            self.lock.acquire()
            if self.lock.stale:
                info = self.lock.stale
                print(f"note: {self.lock.path} was left by PID {info.get('pid')} ({info.get('command', '?')}, started "
                      f"{info.get('started', '?')}), which is no longer running; this run takes the folder over.",
                      file=sys.stderr)
        record = self._read_record()
        self._before = {f: ((self.folder / f).read_bytes() if (self.folder / f).exists() else None)
                        for f in (RUN_FILE, RESOLVED_NAME, *RUN_OUTPUTS)}
        new = as_plain(self.settings)
        history: list[dict[str, Any]] = []
        if record is not None and record.get("task") not in (self.task.name, *self.task.aliases) and not self.overwrite:
            raise ConfigError(f"{self.folder} holds a run of task {record.get('task')!r}, not {self.task.name!r}. "
                              "Use another --out, or --overwrite to start over.")
        if self.overwrite:
            self._wipe(record, trainings)
            record = None
        if record is not None:
            old = record.get("settings", {})
            diff = differing(cls, old, new)
            if diff:
                changes = ", ".join(_describe_change(k, old.get(k), new.get(k)) for k in diff)
                allowed = ", ".join(sorted(k for k in runtime_keys(cls)))
                raise ConfigError(
                    f"{self.folder} holds a run with other settings (differs in: {changes}). "
                    f"Settings that may change on --resume: {allowed}. Use another --out, the same settings, "
                    "or --overwrite to start over.")
            self.previous = old
            history = list(record.get("history", []))
        if not self.resume and any(self._has_checkpoint(n) for n in trainings):
            raise ConfigError(f"{self.folder} already holds a run ({CHECKPOINT_NAME}). Pass --resume to continue "
                              "it, --overwrite to start over, or another --out.")
        if self.resume and not any(self._has_checkpoint(n) for n in trainings):
            where = self.training_folder(trainings[0]) if self.single else self.folder
            raise ConfigError(f"--resume: {where} holds no checkpoint ({CHECKPOINT_NAME}), so there is nothing to "
                              "continue. Start the run without --resume.")
        if not self.resume and parallel.is_writer():
            for f in RUN_OUTPUTS:
                (self.folder / f).unlink(missing_ok=True)
        changed = {k: {"from": self.previous.get(k), "to": v} for k, v in new.items()
                   if self.previous is not None and k in self.previous and self.previous.get(k) != v
                   and k not in ("resume", "overwrite")}
        history.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": self.command, "resume": self.resume,
                        "trainings": list(trainings), **({"changed": changed} if changed else {})})
        known = list(dict.fromkeys([*(record or {}).get("trainings", []), *trainings]))
        _write_json(self.folder / RUN_FILE, {"format": RUN_FORMAT, "task": self.task.name, "settings": new,
                                             "sources": self.sources, "trainings": known, "history": history,
                                             "provenance": provenance()})
        if parallel.is_writer():
            write_config(self.folder, new, self.sources,
                         header=f"{self.command}: the settings this run used\nre-run: bbzo ... --config "
                                f"{self.folder / RESOLVED_NAME}")
        return self

    @classmethod
    def settings_of(cls, folder: Path, task: Task) -> Any:
        """The settings recorded in a run folder (for evaluating a trained run)."""
        path = Path(folder) / RUN_FILE
        if not path.exists():
            raise ConfigError(f"{folder} holds no run ({RUN_FILE} is missing); train there first.")
        rec = json.loads(path.read_text())
        if rec.get("task") not in (task.name, *task.aliases):
            raise ConfigError(f"{folder} holds a run of task {rec.get('task')!r}, not {task.name!r}.")
        return from_plain(task.settings, rec["settings"], str(path))

    # ------------------------------------------------------------------ one training
    def train(self, name: str, build: Callable[[BuildContext], Optional[Training]]) -> dict[str, Any]:
        """Build, resume if asked, train, evaluate and save one training; returns its summary (``train.json``)."""
        folder = self.training_folder(name)
        resuming = self.resume and self._has_checkpoint(name)
        if not resuming:
            self._clean_training(folder)
        folder.mkdir(parents=True, exist_ok=True)
        ledger = QueryLedger(max_queries=getattr(self.settings, "max_queries", None))
        t0 = time.perf_counter()
        spec = build(BuildContext(self, name, folder, resuming, ledger))
        if spec is None:  # nothing to train (a baseline)
            if name and parallel.is_writer() and not any(folder.iterdir()):
                folder.rmdir()
            summary = {"method": name, "steps": 0}
            self.summaries[name] = summary
            return summary
        try:
            return self._train(name, folder, spec, ledger, resuming, time.perf_counter() - t0)
        finally:
            for o in spec.oracles:
                o.close()

    def _train(self, name: str, folder: Path, spec: Training, ledger: QueryLedger, resuming: bool,
               setup_s: float) -> dict[str, Any]:
        for o in spec.oracles:
            if o.ledger is not ledger:
                ledger.attach(o)
        trainer = Trainer(spec.model, spec.objective, spec.estimator, spec.optimizer, spec.data, max_steps=spec.steps,
                          scheduler=spec.scheduler, ledger=ledger, run_dir=folder, checkpoint_every=spec.checkpoint_every,
                          log_every=spec.log_every, adapter=spec.adapter, **spec.trainer_kw)
        writer = parallel.is_writer()
        if writer:
            JSONLLogger(folder / "metrics.jsonl", extra=spec.log_extra).attach(trainer)
        bar = ProgressBar(desc=spec.desc or name or self.task.name, disable=not (self.progress and writer)).attach(trainer)
        BudgetGuard().attach(trainer)
        initial = None
        if spec.evaluate is not None:
            with ledger.evaluation():
                initial = spec.evaluate(spec.model)
            PeriodicEval(spec.evaluate, spec.eval_every).attach(trainer)
        resumed_from = 0
        if resuming:
            trainer.resume()
            resumed_from = trainer.step_count
            left = ledger.queries_left()
            if not trainer.done and left is not None and trainer.query_cost() > left:
                raise ConfigError(
                    f"the query budget of this run is spent: {ledger.queries} of --max-queries {ledger.max_queries} "
                    f"used, and the next step costs {trainer.query_cost()}. Raise --max-queries to continue.")
        else:
            trainer.elapsed += setup_s
        if parallel.world_size() > 1:
            parallel.agree(self._fingerprint(name, trainer, spec))
        start_step = trainer.step_count
        try:
            trainer.run()
        except (BbzoError, KeyboardInterrupt) as caught:
            hold_signals()  # stopping with this error: the launcher's SIGTERM (a peer died) must not replace it
            bar.close()
            e: BaseException = caught
            if isinstance(e, KeyboardInterrupt) and parallel.world_size() > 1:
                dead = parallel.silent_peers()  # the launcher stops the survivors when a rank dies: name that rank
                if dead:
                    e = WorkerError(
                        f"rank {', '.join(map(str, dead))} did not finish step {trainer.step_count + 1}: it stopped "
                        "without a word (it died or was killed; its log shows why), and the launcher then stopped "
                        f"the other ranks with {SIGNAL_NAMES.get(getattr(e, 'signum', 15), 'a signal')}")
            self.progressed = self.progressed or trainer.step_count > start_step
            interrupted = isinstance(e, KeyboardInterrupt)
            self.summaries[name] = {"method": name, "status": "interrupted" if interrupted else "failed",
                                    "steps": trainer.step_count, "error": str(e) or type(e).__name__,
                                    "queries": ledger.queries, "oracle_rows": ledger.rows(), "elapsed_s": trainer.elapsed}
            _write_json(folder / "train.json", self.summaries[name])
            saved = self._saved(trainer)
            if interrupted:
                signum = e.signum if isinstance(e, Interrupted) else 2
                raise Interrupted(signum, f"{SIGNAL_NAMES.get(signum, 'a signal')} stopped the run during step "
                                          f"{trainer.step_count + 1}.{saved}") from caught
            hint = " Fix the cause and rerun with --resume to continue." if "is saved in" in saved else ""
            raise type(e)(f"{e}{saved}{hint}" if str(e).endswith(".") else f"{e}.{saved}{hint}") from caught
        finally:
            bar.close()
        self.progressed = self.progressed or trainer.step_count > start_step
        final = None
        if spec.evaluate is not None:
            with ledger.evaluation():
                final = spec.evaluate(spec.model)
        if writer:
            atomic_write_bytes(folder / spec.weights, lambda f: torch.save(spec.model.state_dict(), f))
        summary: dict[str, Any] = {
            "method": name, "status": "done", "steps": trainer.step_count,
            "stopped_by": trainer.stop_reason or "steps", "resumed_from_step": resumed_from,
            "params": sum(p.numel() for p in spec.model.parameters() if p.requires_grad),
            "queries": ledger.queries, "queries_per_step": trainer.query_cost(),
            "oracle_rows": ledger.rows(), "wall_s": round(trainer.elapsed, 1), "elapsed_s": trainer.elapsed,
            "final_train_loss": trainer.status.get("loss"),
            "estimator": spec.estimator.info.name, "zeroth_order": spec.estimator.info.zeroth_order,
            "ledger": ledger.summary(), "workers": parallel.world_size(),
        }
        summary.update(setup_s=round(setup_s, 1), train_s=round(_step_seconds(folder, trainer, setup_s), 1))
        if initial is not None:
            summary["eval_initial"], summary["eval_final"] = initial, final
        if spec.summary is not None:
            summary.update(spec.summary(trainer))
        if summary.get("epochs"):  # a rate of the steps alone (set-up and evaluations excluded)
            summary["train_s_per_epoch"] = round(summary["train_s"] / summary["epochs"], 2)
        _write_json(folder / "train.json", summary)
        self.summaries[name] = summary
        return summary

    def resume_command(self) -> str:
        """The command that continues this run: the same one, with ``--resume`` and without ``--overwrite``."""
        words = [w for w in self.command.split() if w != "--overwrite"]
        return " ".join(words + ([] if "--resume" in words else ["--resume"]))

    def _saved(self, trainer: Trainer) -> str:
        """What the checkpoint on disk holds, read back (a sentence that is true whatever happened)."""
        if not parallel.is_writer():
            return f" Rank {parallel.rank()} writes no checkpoint; rank 0 reports what is saved."
        path = trainer.checkpoint_path
        step = None
        if path is not None and (path.exists() or previous_path(path).exists()):
            try:
                step = int(load_checkpoint(path, map_location="cpu")["step"])
            except (BbzoError, KeyError, OSError, ValueError):
                step = None
        if step is None:
            return " No step had completed; nothing was saved."
        return f" The checkpoint {path} holds step {step}; continue with: {self.resume_command()}"

    def _fingerprint(self, name: str, trainer: Trainer, spec: Training) -> dict[str, str]:
        """What every rank of a distributed run must agree on before the first step (values short and comparable)."""
        import hashlib

        def digest(obj: Any) -> str:
            h = hashlib.sha256()
            for leaf in (obj if isinstance(obj, (list, tuple)) else [obj]):
                if isinstance(leaf, torch.Tensor):
                    h.update(leaf.detach().cpu().contiguous().numpy().tobytes())
                elif isinstance(leaf, dict):
                    for k in sorted(leaf):
                        h.update(str(k).encode())
                        h.update(digest(leaf[k]).encode())
                elif leaf is not None:
                    h.update(repr(leaf).encode())
            return h.hexdigest()[:16]

        local = {"out", "no_progress", "no_plots", "workers", "worker_timeout"}  # may differ per node
        settings = {k: v for k, v in sorted(as_plain(self.settings).items()) if k not in local}
        inputs, targets = spec.data.get_batch(trainer.step_count)
        prov = provenance()
        return {"training": name, "settings": digest(json.dumps(settings, sort_keys=True, default=str)),
                "checkpoint step": str(trainer.step_count), "weights": digest(dict(trainer.model.state_dict())),
                "data (this step's batch)": digest([inputs, targets] if not isinstance(inputs, tuple)
                                                   else [*inputs, targets]),
                "bbzo": str(prov["versions"].get("bbzo")), "torch": str(prov["versions"].get("torch"))}

    # ------------------------------------------------------------------ the end
    def finish(self, results: dict[str, Any]) -> dict[str, Any]:
        """Write ``results.json`` (and ``results.md`` from ``results["table"]``) and the loss plot."""
        plots = list(results.get("plots", []))
        if self.plots:
            curves = {}
            for name, summary in self.summaries.items():
                metrics = self.training_folder(name) / "metrics.jsonl"
                if metrics.exists():  # a single training is labelled by its estimator (cge, autograd, ...)
                    curves[name or str(summary.get("estimator") or self.task.name)] = read_jsonl(metrics)
            path = plot_losses(self.folder / "loss.png", curves, title=f"{self.task.name}: loss")
            if path is not None:
                plots.append(str(path))
        out = {k: v for k, v in results.items() if k not in ("table", "plots")}
        out.setdefault("status", "done")
        _write_json(self.folder / "results.json", out)
        if results.get("table"):
            (self.folder / "results.md").write_text(results["table"] + "\n")
        return {**results, "plots": plots}

    def fail(self, error: BaseException) -> None:
        """Record a failed run: ``results.json`` with its status, the error and how far each training got.

        An invocation that completed no step leaves the run-level files as it found them instead (a set-up error
        claims no folder, a refused ``--resume`` overwrites nothing)."""
        if not parallel.is_writer():
            return
        try:
            if not self.progressed:
                self._restore()
                return
            _write_json(self.folder / "results.json", {
                "status": "interrupted" if isinstance(error, KeyboardInterrupt) else "failed",
                "error": f"{type(error).__name__}: {error}", "task": self.task.name,
                "trainings": {n or self.task.name: s for n, s in self.summaries.items()}})
        except OSError:  # the folder itself is the problem: the error already says what happened
            pass

    def _restore(self) -> None:
        for name, data in self._before.items():
            path = self.folder / name
            if data is None:
                path.unlink(missing_ok=True)
            elif not path.exists() or path.read_bytes() != data:
                atomic_write_bytes(path, lambda f, d=data: f.write(d))

    def close(self) -> None:
        """Release the folder (the end of the invocation, whatever happened)."""
        self.lock.release()


def run_task(task: Task, settings: Any, sources: Optional[dict[str, str]] = None, *,
             trainings: Optional[Sequence[str]] = None, evaluate: bool = True,
             command: Optional[str] = None) -> dict[str, Any]:
    """Run ``task`` with ``settings``: folder policy, every training, evaluation, results and plots.

    Args:
        trainings: A subset of the task's trainings (e.g. one method); default: all of them.
        evaluate: Call the task's ``evaluate`` and write the results (False: train only).
    Returns:
        The results dict (``results["table"]``, ``results["plots"]``), or ``{"trainings": summaries}``
        when not evaluating.
    """
    if task.threads is not None:
        torch.set_num_threads(task.threads)
    check_device(getattr(settings, "device", "cpu"))
    ctx = parallel.setup(getattr(settings, "worker_timeout", parallel.DEFAULT_WORKER_TIMEOUT),
                         device=getattr(settings, "device", "cpu"))
    if ctx is None and getattr(settings, "workers", 1) > 1:
        raise ConfigError(f"workers={settings.workers} needs processes to share the work: use the bbzo command "
                          "(--workers M starts them with torch.distributed.run), or start your script with "
                          f"`torchrun --nproc-per-node {settings.workers} script.py` and leave workers at 1.")
    names = list(trainings) if trainings is not None else list(task.trainings(settings))
    if not names:
        raise ConfigError(f"task {task.name}: nothing to train (no trainings given).")
    run = Run(Path(settings.out), task, settings, sources, resume=settings.resume, overwrite=settings.overwrite,
              progress=not settings.no_progress, plots=not getattr(settings, "no_plots", False), command=command)
    restore_signals = install_signals()
    try:
        run.open(names)
        if task.prepare is not None:
            run.shared = task.prepare(settings, run)
        for n in names:
            run.train(n, lambda ctx, n=n: task.build(settings, n, ctx))
        if not evaluate or task.evaluate is None or not parallel.is_writer():  # rank 0 evaluates and reports
            return {"trainings": run.summaries}
        return run.finish(task.evaluate(settings, run, run.summaries))
    except BaseException as e:
        hold_signals()  # stopping already: a later SIGTERM (the launcher's, when a peer died) must not cut the report
        run.fail(e)
        if isinstance(e, OSError):
            raise ConfigError(f"could not read or write {getattr(e, 'filename', None) or run.folder}: "
                              f"{e.strerror or e}. Free space or fix the permissions of {run.folder}, then rerun the "
                              "same command" + (" with --resume" if run.progressed else "") + "; the last checkpoint "
                              "on disk is intact (it is only ever replaced atomically).") from e
        if isinstance(e, KeyboardInterrupt) and not isinstance(e, Interrupted):
            raise Interrupted(2, f"SIGINT stopped the run.{' The last completed step is saved; continue with: ' + run.resume_command() if run.progressed else ' No step had completed.'}") from e
        raise
    finally:
        run.close()
        restore_signals()


def check_device(device: Any) -> None:
    """A clear error for a device this machine does not have (before anything is loaded)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is visible here (torch.cuda.is_available() is False). "
                          "Use --device cpu, or check the GPU driver and CUDA_VISIBLE_DEVICES.")
