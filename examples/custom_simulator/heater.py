"""The Python side of the custom-simulator example: model, data, and the simulator as a Python oracle.

The black box is a room-heating simulator: two heater settings ``(u1, u2)`` for two 4-hour phases go
in, the room temperature at the end of each phase comes out. ``heater.awk`` is the simulator as an
external program (any language works the same way); :func:`simulate` and :class:`HeaterOracle` are the
same physics in numpy, to show the two ways of plugging in a Python simulator. The task: a small
network maps a *wanted* pair of temperatures to heater settings, trained only by querying the black
box (loss: squared error between the temperatures reached and the ones wanted).

Used by reference from the command line, no install needed::

    bbzo train --config examples/custom_simulator/run.yaml                          # the awk program
    bbzo train --config examples/custom_simulator/run.yaml \\
               --oracle examples/custom_simulator/heater.py:HeaterOracle              # Python, Oracle class
    bbzo train --config examples/custom_simulator/run.yaml \\
               --oracle examples/custom_simulator/heater.py:simulate                  # Python, plain function
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bbzo.oracle import Oracle

# the constants of heater.awk
T0, T_OUT, K, GAIN, T_MAX, DT, N_STEP = 12.0, 5.0, 0.15, 6.0, 26.0, 0.05, 80


def simulate(u: np.ndarray, outside: float = T_OUT) -> np.ndarray:
    """``u``: ``(N, 2)`` heater settings -> ``(N, 2)`` temperatures [deg C] after 4 h and 8 h.

    A plain batched numpy function: ``--oracle heater.py:simulate`` wraps it in a
    :class:`bbzo.FunctionOracle` (``--oracle-array numpy``, the default, hands it numpy arrays).
    """
    u = np.clip(np.asarray(u, dtype=np.float64), 0.0, 1.0)
    t = np.full(u.shape[0], T0)
    out = np.empty((u.shape[0], 2))
    for s in range(2 * N_STEP):
        power = np.where(t < T_MAX, GAIN * u[:, 0 if s < N_STEP else 1], 0.0)
        t = t + DT * (power - K * (t - outside))
        if s == N_STEP - 1:
            out[:, 0] = t
    out[:, 1] = t
    return out


class HeaterOracle(Oracle):
    """The same simulator as an :class:`bbzo.Oracle` subclass (``--oracle heater.py:HeaterOracle``).

    Subclassing gives declared shapes (checked on every query) and a place for settings:
    ``--oracle-kwargs '{outside: -2}'`` changes the outside temperature.
    """

    def __init__(self, outside: float = T_OUT, **kw) -> None:
        super().__init__(name=kw.pop("name", "heater-python"), input_shape=(2,), output_shape=(2,), **kw)
        self.outside = float(outside)

    def _query(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(simulate(inputs.cpu().numpy(), self.outside)).to(inputs)


class Celsius(nn.Module):
    """Wanted temperatures [deg C] -> roughly [-1, 1]."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return (t - 17.0) / 6.0


def build(hidden: int = 16) -> nn.Sequential:
    """The white-box model: wanted ``(T1, T2)`` -> heater settings in ``(0, 1)`` (82 parameters at 16)."""
    return nn.Sequential(Celsius(), nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2), nn.Sigmoid())


def make_data(n: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)``: ``n`` reachable temperature pairs (the simulator's answers to random settings).

    The inputs are the wanted temperatures and the targets are the same numbers: the loss compares what
    the simulator reached with what was wanted.
    """
    rng = np.random.default_rng(seed)
    wanted = torch.from_numpy(simulate(rng.uniform(0.05, 0.95, size=(n, 2)))).float()
    return wanted, wanted.clone()
