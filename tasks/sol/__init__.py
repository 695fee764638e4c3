"""ZO-SOL: train a PDE corrector *through* a non-differentiable PhiFlow solver (DeepZero §6.2, App. H).

* :mod:`.settings` -- the settings and presets (demo / small / paper);
* :mod:`.data` -- the high-fidelity reference data, generated once per setting and cached;
* :mod:`.methods` -- SRC, NON, NOG, ZO-SOL and FO-SOL as trainings of the shared run lifecycle;
* :mod:`.evaluate` -- rollouts on the held-out Re, MAE per Re and over time;
* :mod:`.report` -- the table and the pictures.

``bbzo sol run|generate|train|eval`` is the command line (:mod:`bbzo.cli.sol`).
"""

from __future__ import annotations

import time
from typing import Any

from bbzo.config import as_plain
from bbzo.run import Run
from bbzo.task import Task, register_task

from .data import DataSettings, RolloutBatches, SolData, generate, load
from .evaluate import evaluate, evaluate_run, vorticity
from .methods import BUILDERS, build_method, features, load_corrector, make_corrector, make_rollout, nog_rollout, non_pairs
from .report import plot_results, results_table
from .settings import METHOD_NAMES, METHOD_SETTINGS, METHODS, PRESETS, SolSettings

__all__ = ["SolSettings", "PRESETS", "METHODS", "METHOD_NAMES", "METHOD_SETTINGS", "DataSettings", "SolData", "RolloutBatches",
           "generate", "load", "make_corrector", "load_corrector", "make_rollout", "nog_rollout", "features", "non_pairs",
           "BUILDERS",
           "evaluate", "evaluate_run", "vorticity", "results_table", "plot_results", "TASK"]


def _prepare(s: SolSettings, run: Run) -> SolData:
    t0 = time.perf_counter()
    data = generate(s.data, s.data_dir, progress=not s.no_progress, device=s.device)
    run.data_seconds = round(time.perf_counter() - t0, 1)  # type: ignore[attr-defined]
    return data


def _evaluate(s: SolSettings, run: Run, summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    t1 = time.perf_counter()
    summary = evaluate_run(s, run.folder, s.methods, plots=run.plots, data=run.shared)
    data: SolData = run.shared
    summary.update({"config": as_plain(s), "data_seconds": getattr(run, "data_seconds", None), "data_meta": data.meta,
                    "train": {m: summaries.get(m, {"method": m}) for m in s.methods},
                    "eval_seconds": round(time.perf_counter() - t1, 1),
                    "total_seconds": round(time.perf_counter() - run.started, 1)})
    return summary


TASK = register_task(Task(
    name="sol", settings=SolSettings, trainings=lambda s: s.methods, build=build_method, evaluate=_evaluate,
    prepare=_prepare, training_files=("corrector.pt", "lpr.json"), threads=1,
    description="ZO-SOL: a PDE corrector trained through the non-differentiable PhiFlow solver"))
