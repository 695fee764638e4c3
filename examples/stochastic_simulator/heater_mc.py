"""A stochastic simulator: the room heater of ``examples/custom_simulator`` under random weather (Monte Carlo).

The physics is ``heater.awk``'s (two heater settings ``(u1, u2)`` for two 4-hour phases in, the room
temperature at the end of each phase out; Newton cooling, explicit Euler steps of 3 minutes, a thermostat
that cuts the heater at 26 deg C), with two random disturbances per Monte Carlo path:

* the outside temperature is ``5 + o`` deg C, ``o ~ N(0, 2^2)`` per path (the weather of the day);
* the heat-loss coefficient is ``0.15 (1 + 0.3 e_t)`` in every 3-minute step, ``e_t ~ N(0, 1)`` (wind gusts).

An answer is the mean over ``paths`` paths, so it is noisy: two calls on the same row differ by about
0.3 deg C. A finite difference of two such calls at ``mu = 1e-3`` is pure noise -- unless both calls use the
same random numbers (**common random numbers**, ``docs/check.md``). This simulator takes a ``seed``:

* with ``seed=s`` every row is answered from one draw of the noise made from ``s`` (the same draw for every
  row), so the answer is a function of the row and the seed alone, whatever else is in the call;
* without a seed every row draws its own noise (from ``rng``, or fresh OS entropy), as most simulators do.

bbzo hands it the seed of the current training step when common random numbers are on (the trainer's
``crn_seed``; ``bbzo.oracle.common_random_numbers``). Three ways to use it:

    bbzo check --config examples/stochastic_simulator/run.yaml        # finds the noise and the seed
    bbzo train --config examples/stochastic_simulator/run.yaml        # a Python function (simulate)
    bbzo train --config examples/stochastic_simulator/run.yaml \\
               --oracle-cmd "python3 examples/stochastic_simulator/heater_mc.py"   # the same as a program

Run as a program (any Python with numpy) it speaks the bbzo oracle protocol with the ``seed`` capability
(revision 1.2: ``bbzo-oracle 1 2 2 f64le seed``, then ``query <n> 2 seed=<s>``).
"""

from __future__ import annotations

import sys
from typing import Optional

import numpy as np

# the constants of examples/custom_simulator/heater.awk
T0, T_OUT, K, GAIN, T_MAX, DT, N_STEP = 12.0, 5.0, 0.15, 6.0, 26.0, 0.05, 80
OUTSIDE_SD, GUST_SD, PATHS = 2.0, 0.3, 8


def simulate(u: np.ndarray, seed: Optional[int] = None, paths: int = PATHS,
             rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """``u``: ``(N, 2)`` heater settings -> ``(N, 2)`` mean temperatures [deg C] after 4 h and 8 h over ``paths`` paths.

    ``seed``: draw the noise once from ``seed`` and use it for every row (common random numbers); ``None``:
    every row draws its own noise from ``rng`` (default: fresh OS entropy, so two calls never agree).
    """
    u = np.clip(np.asarray(u, dtype=np.float64), 0.0, 1.0)
    n = u.shape[0]
    if seed is not None:  # one draw, broadcast to every row: a row's answer depends on the row and the seed only
        g = np.random.default_rng(seed)
        outside = T_OUT + OUTSIDE_SD * g.standard_normal((1, paths))
        gusts = GUST_SD * g.standard_normal((1, paths, 2 * N_STEP))
    else:
        g = rng if rng is not None else np.random.default_rng()
        outside = T_OUT + OUTSIDE_SD * g.standard_normal((n, paths))
        gusts = GUST_SD * g.standard_normal((n, paths, 2 * N_STEP))
    t = np.full((n, paths), T0)
    out = np.empty((n, 2))
    for s in range(2 * N_STEP):
        power = np.where(t < T_MAX, GAIN * u[:, 0 if s < N_STEP else 1, None], 0.0)
        t = t + DT * (power - K * (1.0 + gusts[..., s]) * (t - outside))
        if s == N_STEP - 1:
            out[:, 0] = t.mean(axis=1)
    out[:, 1] = t.mean(axis=1)
    return out


def expected(u: np.ndarray, paths: int = 4096, seed: int = 12345) -> np.ndarray:
    """The expected temperatures (many paths, a fixed seed): what a model is judged by after training."""
    return simulate(u, seed=seed, paths=paths)


def make_data(n: int = 2048, seed: int = 0):
    """``(inputs, targets)``: ``n`` reachable pairs of expected temperatures (both the same numbers, as the heater)."""
    import torch

    rng = np.random.default_rng(seed)
    wanted = torch.from_numpy(expected(rng.uniform(0.05, 0.95, size=(n, 2)), paths=512)).float()
    return wanted, wanted.clone()


def build(hidden: int = 16):
    """The white-box model: wanted ``(T1, T2)`` -> heater settings in ``(0, 1)`` (82 parameters at 16)."""
    from torch import nn

    class Celsius(nn.Module):
        def forward(self, t):
            return (t - 17.0) / 6.0

    return nn.Sequential(Celsius(), nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2), nn.Sigmoid())


def _oracle_class():
    from bbzo.oracle import Oracle

    class MonteCarloHeater(Oracle):
        """The simulator as an :class:`bbzo.Oracle` with its own seeded noise stream (reproducible without a seed).

        ``noise_seed`` seeds the stream used when no common-random-numbers seed is handed in; ``paths`` as
        :func:`simulate`.
        """

        def __init__(self, paths: int = PATHS, noise_seed: Optional[int] = None, **kw) -> None:
            super().__init__(name=kw.pop("name", "heater-mc"), input_shape=(2,), output_shape=(2,), **kw)
            self.paths = int(paths)
            self.rng = np.random.default_rng(noise_seed)

        def _query(self, inputs, seed: Optional[int] = None):
            import torch

            out = simulate(inputs.cpu().numpy(), seed=seed, paths=self.paths, rng=self.rng)
            return torch.from_numpy(out).to(inputs)

    return MonteCarloHeater


def __getattr__(name: str):  # MonteCarloHeater is built on first use: the program mode needs numpy only
    if name == "MonteCarloHeater":
        return _oracle_class()
    raise AttributeError(name)


def serve(inp=None, out=None, noise_seed: Optional[int] = None) -> None:
    """Speak the bbzo oracle protocol (f64le, with the ``seed`` capability) on stdin/stdout until ``quit``."""
    inp = inp or sys.stdin.buffer
    out = out or sys.stdout.buffer
    rng = np.random.default_rng(noise_seed)
    out.write(b"bbzo-oracle 1 2 2 f64le seed\n")
    out.flush()
    while True:
        line = inp.readline()
        parts = line.split()
        if not parts or parts[0] == b"quit":
            return
        fields = dict(p.split(b"=", 1) for p in parts[3:] if b"=" in p)
        if parts[0] != b"query" or len(parts) < 3 or parts[2] != b"2":
            out.write(b"error heater_mc.py expected 'query <n> 2 [seed=<s>]', got: " + line[:80].strip() + b"\n")
            out.flush()
            continue
        n = int(parts[1])
        u = np.frombuffer(inp.read(16 * n), dtype="<f8").reshape(n, 2)
        seed = int(fields[b"seed"]) if b"seed" in fields else None
        ans = simulate(u, seed=seed, rng=rng)
        out.write(f"ok {n} 2\n".encode() + ans.astype("<f8").tobytes())
        out.flush()


if __name__ == "__main__":
    serve(noise_seed=int(sys.argv[1]) if len(sys.argv) > 1 else None)
