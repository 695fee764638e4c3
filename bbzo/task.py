"""Tasks by name: a settings dataclass plus build / evaluate functions, found through a registry.

A :class:`Task` is all an application writes. The engine's :func:`bbzo.run.run_task` gives it the run
folder policy, the resolved config, resume, the progress bar, JSONL metrics, checkpoints, the loss
plots and the results files; :mod:`bbzo.cli.tasks` gives it a command line generated from the
settings. ``docs/adding_a_task.md`` walks through a complete one.

* ``trainings(settings) -> names``: the trainings of one run (one per method or estimator), each in
  ``OUT/<name>``; the single name ``""`` trains in ``OUT`` itself.
* ``build(settings, name, ctx) -> Training | None``: the parts of one training (see
  :class:`bbzo.run.Training`); ``None`` when the method needs no training (a baseline).
* ``evaluate(settings, run, summaries) -> results``: the run's results (a dict; ``results["table"]``,
  a Markdown table, is also written as ``results.md``; ``results["plots"]`` lists pictures it drew).
* ``prepare(settings, run) -> shared``: work every training needs (e.g. reference data), once.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from .config import setting
from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .run import BuildContext, Run, Training

__all__ = ["Task", "RunSettings", "register_task", "get_task", "list_tasks", "describe_task", "lazy_exports", "later"]


@dataclass
class RunSettings:
    """The settings every task has: where the run lives and how it is (re)started. Never compared."""

    out: Any = setting(None, help="Run folder: metrics.jsonl, checkpoints, results.json/.md, config.resolved.yaml, plots.",
                       kind="path", runtime=True)
    resume: bool = setting(False, help="Continue the run in --out from its checkpoint(s).", runtime=True)
    overwrite: bool = setting(False, help="Start over even if --out holds a run (with other settings, too).",
                              runtime=True)
    no_progress: bool = setting(False, help="No progress bars.", runtime=True)
    no_plots: bool = setting(False, help="Skip the PNG plots.", runtime=True)
    workers: int = setting(1, runtime=True, help=(
        "Processes that share each step's queries (forward parallelization over torch.distributed; started "
        "with torch.distributed.run). Under torchrun the launcher's world size is used instead."))
    worker_timeout: float = setting(30.0, runtime=True, help=(
        "Seconds a distributed step waits for its slowest worker before every worker stops with an error "
        "naming it (a dead or hung worker)."))


@dataclass(frozen=True)
class Task:
    """An application of the engine (see the module docstring).

    Args:
        training_files: Files of a training folder, besides the standard ones, that a fresh start removes.
        threads: torch threads for the whole run (``None``: leave torch's choice).
        aliases: Former names (run folders written under them are still this task's).
    """

    name: str
    settings: type
    description: str
    trainings: Callable[[Any], Sequence[str]]
    build: Callable[[Any, str, "BuildContext"], Optional["Training"]]
    evaluate: Optional[Callable[[Any, "Run", dict[str, dict[str, Any]]], dict[str, Any]]] = None
    prepare: Optional[Callable[[Any, "Run"], Any]] = None
    training_files: tuple[str, ...] = ()
    threads: Optional[int] = None
    aliases: tuple[str, ...] = ()


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add a task to the registry (raises on a duplicate name)."""
    for name in (task.name, *task.aliases):
        if name in _TASKS:
            raise ConfigError(f"a task named {name!r} is already registered.")
    for name in (task.name, *task.aliases):
        _TASKS[name] = task
    return task


def _shipped() -> dict[str, tuple[str, str]]:
    """The tasks shipped with bbzo: name -> (module, description); nothing of them is imported here."""
    from bbzo.tasks import SHIPPED
    return SHIPPED


def _hidden() -> tuple[str, ...]:
    from bbzo.tasks import ALIASES
    return ALIASES


def list_tasks(pattern: str = "*") -> list[str]:
    """The task names (registered ones and the shipped ones, which are not imported to list them)."""
    names = {n for n, t in _TASKS.items() if n == t.name} | (set(_shipped()) - set(_hidden()))
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def describe_task(name: str) -> str:
    """A task's one-line description, without importing a shipped task."""
    if name in _TASKS:
        return _TASKS[name].description
    if name in _shipped():
        return _shipped()[name][1]
    return get_task(name).description


def get_task(name: str) -> Task:
    """The task called ``name`` (a shipped task's module is imported on first use)."""
    if name not in _TASKS and name in _shipped():
        import importlib
        importlib.import_module(_shipped()[name][0])
    if name not in _TASKS:
        raise ConfigError(f"unknown task {name!r}; registered: {', '.join(list_tasks())}.")
    return _TASKS[name]


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A PEP 562 ``__getattr__`` for a task package: ``exports`` maps a public name to the submodule defining it,
    imported on first use (so ``bbzo <command> --help`` does not load the task's training code)."""
    from importlib import import_module

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f"{package}.{module}"), name)
        setattr(import_module(package), name, value)  # the next lookup is a plain attribute
        return value

    return __getattr__


def later(package: str, module: str, name: str) -> Callable[..., Any]:
    """``package.module.name``, imported when first called (a task's code loads when a run or stage starts)."""
    from importlib import import_module

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(import_module(f"{package}.{module}"), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call
