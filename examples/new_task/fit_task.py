"""A complete bbzo task in one file: fit a linear model through a black box that doubles its input.

Run it with ``bbzo run --import examples/new_task/fit_task.py fit-line --steps 40`` (or from Python,
``bbzo.run.run_task(TASK, settings)``). Everything a user sees -- flags, ``--config``, ``config.resolved.yaml``,
resume, the progress bar, ``metrics.jsonl``, checkpoints, ``loss.png``, ``results.json`` and ``results.md`` --
comes from the engine; this file only says what is trained, through what, and what to report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

import bbzo
from bbzo.config import setting
from bbzo.data import TensorBatches
from bbzo.objective import OracleObjective
from bbzo.optim import cosine_with_warmup
from bbzo.oracle import FunctionOracle
from bbzo.run import BuildContext, Run, Training
from bbzo.task import RunSettings, Task, register_task

__all__ = ["FitSettings", "TASK"]


# 1. The settings, declared once: each field's help is its --help text; runtime=True ones may change on --resume.
@dataclass
class FitSettings(RunSettings):
    out: Path = setting(Path("runs/fit-line"), kind="path", runtime=True, help="Run folder.")
    steps: int = setting(12, runtime=True, help="Training steps.")
    lr: float = setting(0.3, help="Adam learning rate.")
    estimator: str = setting("cge", choices=("cge", "rge"), help="Gradient estimator.")
    seed: int = setting(0, help="Seed of the data and the model.")
    max_queries: Optional[int] = setting(None, runtime=True, help="Query budget (the run stops cleanly before it).")
    checkpoint_every: int = setting(3, runtime=True, help="Checkpoint every N steps.")


def simulate(rows):
    """The black box (numpy in, numpy out): a program bbzo may only query."""
    return 2.0 * rows


# 2. What one training is: model, objective (which queries the oracle), estimator, optimizer, data.
def build(s: FitSettings, name: str, ctx: BuildContext) -> Training:
    g = torch.Generator().manual_seed(s.seed)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    torch.manual_seed(s.seed)
    model = nn.Linear(3, 1).double()
    oracle = FunctionOracle(simulate, numpy=True, name="doubler")
    # model outputs -> oracle rows -> answers -> per-sample losses (N,)
    objective = OracleObjective(oracle, lambda ans, out, inp, t: (ans - 2 * t).pow(2).flatten(1).mean(1),
                                needs_inputs=False)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)

    def evaluate(m: nn.Module) -> dict[str, float]:  # run before and after training; its queries are not charged
        with torch.no_grad():
            return {"loss": float(objective(m(x), None, y).mean())}

    return Training(model=model, objective=objective, estimator=bbzo.create_estimator(s.estimator, mu=1e-4),
                    optimizer=opt, data=TensorBatches(x, y, 16, seed=s.seed), steps=s.steps,
                    scheduler=cosine_with_warmup(opt, s.steps, warmup_steps=1), oracles=[oracle], evaluate=evaluate,
                    checkpoint_every=s.checkpoint_every)


# 3. What the run reports: a dict for results.json, and a Markdown table for results.md and the console.
def evaluate(s: FitSettings, run: Run, summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    t = summaries[""]  # one training, in the run folder itself
    before, after = t["eval_initial"]["loss"], t["eval_final"]["loss"]
    return {"steps": t["steps"], "queries": t["queries"], "loss_before": before, "loss_after": after,
            "wall_s": t["wall_s"],
            "table": f"| estimator | queries | loss before | loss after |\n|---|---|---|---|\n"
                     f"| {s.estimator} | {t['queries']} | {before:.4g} | {after:.4g} |"}


# 4. Register it: `bbzo run fit-line ...` now exists, with every setting as a flag.
TASK = register_task(Task(name="fit-line", settings=FitSettings, trainings=lambda s: [""], build=build,
                          evaluate=evaluate,
                          description="fit a line through a black box that doubles its input"))
