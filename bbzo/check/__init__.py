"""``bbzo check``: look at a black box before training through it.

The most common way zeroth-order training fails is not the optimizer but the black box's numerics: answers
that change from call to call, a finite-difference step below the round-off or above the kinks, inputs the
simulator cannot answer, a simulator too slow to batch. :func:`check` measures each of them on a
:class:`Subject` (an oracle at the current point and the coordinate spaces its estimators step in) and says
what the numbers mean; ``bbzo check`` (:mod:`bbzo.cli.check`) builds the subject from a training config, a
program or ZO-SOL's PhiFlow solver and writes the table, ``check.json`` and ``check.png``.

* :mod:`.fd` -- the numerics (ECnoise, the step sweep and its "V"), pure functions;
* :mod:`.spaces` -- the subject and its spaces (parameters, model outputs, oracle inputs, a rollout);
* :mod:`.measure` -- one function per measurement;
* :mod:`.runner` -- :func:`check`: every measurement, and the findings;
* :mod:`.report` -- the console table, the JSON and the plot.

::

    from bbzo.check import Subject, RowSpace, check, format_report
    subject = Subject(oracle, rows, spaces=[RowSpace(oracle, rows)], label="my simulator")
    print(format_report(check(subject)))
"""

from .fd import analyse_sweep, ecnoise, mu_grid
from .measure import cost, determinism, input_range, noise_floor, step_sweep
from .report import format_report, plot_report, write_json
from .runner import check, findings
from .spaces import OutputSpace, ParameterSpace, RolloutSpace, RowSpace, Space, Subject, projection_loss

__all__ = ["check", "findings", "Subject", "Space", "ParameterSpace", "OutputSpace", "RowSpace", "RolloutSpace",
           "projection_loss", "determinism", "noise_floor", "step_sweep", "cost", "input_range", "ecnoise",
           "analyse_sweep", "mu_grid", "format_report", "write_json", "plot_report"]
