import math

import numpy as np
import pytest
import torch

from bbzo import OracleError
from bbzo.oracles import ProjectileOracle, simulate, trajectories


def test_vacuum_range_matches_closed_form_and_drag_shortens_it():
    rows = np.array([[math.pi / 4, 20.0, 0.0, 0.0], [math.pi / 4, 20.0, 0.01, 0.0], [math.pi / 4, 20.0, 0.0, 3.0]])
    out = simulate(rows, dt=0.001)
    assert out[0, 0] == pytest.approx(20.0 ** 2 / 9.81, rel=2e-3)
    assert out[0, 1] == pytest.approx(2 * 20.0 * math.sin(math.pi / 4) / 9.81, rel=2e-3)
    assert out[1, 0] < out[0, 0] - 1.0  # drag
    assert out[2, 0] == pytest.approx(out[0, 0])  # without drag the air (wind) exerts no force
    windy = simulate(np.array([[math.pi / 4, 20.0, 0.01, 3.0]]), dt=0.001)
    assert windy[0, 0] > out[1, 0]  # with drag a tail wind carries the shot further
    assert len(trajectories(rows[:1])[0]) > 10


def test_oracle_batch_equals_rows_one_by_one_and_checks_shapes():
    o = ProjectileOracle()
    x = torch.tensor([[0.3, 15.0, 0.005, 1.0], [1.0, 25.0, 0.0, -2.0], [0.7, 30.0, 0.02, 0.0]], dtype=torch.float64)
    batched = o.query(x)
    single = torch.cat([o.query(x[i:i + 1]) for i in range(3)])
    assert torch.equal(batched, single) and batched.shape == (3, 2)
    with pytest.raises(OracleError, match="shape"):
        o.query(torch.zeros(2, 3))
    with pytest.raises(OracleError, match="require grad"):
        o.query(x.clone().requires_grad_())
