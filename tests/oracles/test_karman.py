"""The PhiFlow Kármán solver and its query-only oracle (small grids so the suite stays fast)."""

import pytest
import torch

from bbzo.errors import OracleError, ShapeError
from bbzo.oracles.karman import KarmanOracle, KarmanSetup, KarmanSolver, downsample_states

SETUP = KarmanSetup(nx=16, ny=32)
RE = torch.tensor([97.7, 390.6, 1562.5, 3125.0])


@pytest.fixture(scope="module")
def states():
    s = KarmanSolver(SETUP, backend="numpy", jit=False).initial_state(RE.tolist())
    g = torch.Generator().manual_seed(0)
    return s + 0.05 * torch.randn(s.shape, generator=g)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_nchw_staggered_round_trip_is_exact(states, backend):
    solver = KarmanSolver(SETUP, backend=backend, jit=False)
    grid = solver.to_grid(states)
    # staggered shapes of a zero-gradient grid: u (nx+1, ny), v (nx, ny+1)
    assert grid.values[{"~vector": "x"}].shape.get_size("x") == SETUP.nx + 1
    assert grid.values[{"~vector": "y"}].shape.get_size("y") == SETUP.ny + 1
    back = solver.from_grid(grid)
    assert back.dtype == states.dtype and torch.equal(back, states)


def test_batched_step_equals_one_at_a_time_bitwise_numpy(states):
    solver = KarmanSolver(SETUP, backend="numpy", jit=False)
    batched = solver.step(states, RE)
    single = torch.cat([solver.step(states[i:i + 1], RE[i:i + 1]) for i in range(len(RE))])
    assert torch.equal(batched, single)
    assert not torch.equal(batched[0], batched[1])  # per-row Re and state really differ


def test_batched_step_torch_jit_matches_numpy(states):
    """Torch kernels round differently per batch size: equal to float32 rounding, not bitwise."""
    torch_solver = KarmanSolver(SETUP, backend="torch", jit=True)
    batched = torch_solver.step(states, RE)
    single = torch.cat([torch_solver.step(states[i:i + 1], RE[i:i + 1]) for i in range(len(RE))])
    ref = KarmanSolver(SETUP, backend="numpy", jit=False).step(states, RE)
    assert (batched - single).abs().max() < 1e-5
    assert (batched - ref).abs().max() < 1e-5


def test_oracle_refuses_grad_wrong_shape_and_nan(states):
    oracle = KarmanOracle(SETUP, backend="numpy")
    with pytest.raises(OracleError, match="require grad"):
        oracle.query(states.clone().requires_grad_(True), RE)
    with pytest.raises(OracleError, match=r"\(N, 2, 32, 16\)"):
        oracle.query(states[:, :, :16], RE)
    with pytest.raises(OracleError, match="condition 0"):
        oracle.query(states, RE[:2])
    with pytest.raises(OracleError, match="needs one Reynolds number"):
        oracle.query(states)
    bad = states.clone()
    bad[2, 0, 5, 5] = float("nan")
    with pytest.raises(OracleError, match="NaN/inf.*row 2"):
        oracle.query(bad, RE)
    assert oracle.rows_used == 0  # nothing was answered, nothing counted


def test_oracle_rejects_a_diverged_answer(states):
    oracle = KarmanOracle(SETUP, backend="numpy")
    huge = states * 1e30  # the pressure solve blows up
    with pytest.raises(OracleError, match="pressure solve failed|NaN/inf"):
        oracle.query(huge, RE)


def test_numpy_oracle_cannot_leak_a_gradient(states):
    oracle = KarmanOracle(SETUP, backend="numpy")
    out = oracle.query(states, RE)
    assert out.grad_fn is None and not out.requires_grad
    assert oracle.rows_used == len(RE) and oracle.calls_used == 1
    with pytest.raises(ShapeError):
        oracle.solver.check_states(states[0])


def test_oracle_pads_batches_to_buckets_without_counting_them(states):
    oracle = KarmanOracle(SETUP, backend="torch", min_bucket=8)
    out = oracle.query(states[:3], RE[:3])
    assert out.shape == (3, *SETUP.shape)
    assert oracle.rows_used == 3 and oracle.pad_rows == 5


def test_downsample_face_average():
    hi = SETUP.scaled(2)
    solver = KarmanSolver(hi, backend="numpy", jit=False)
    s = solver.initial_state([390.6])
    low = downsample_states(s, hi, 2)
    assert low.shape == (1, *SETUP.shape)
    # u keeps every second face along x and averages pairs along y
    assert torch.allclose(low[0, 0, 3, 4], 0.5 * (s[0, 0, 6, 8] + s[0, 0, 7, 8]), atol=1e-6)


def test_jit_step_that_does_not_converge_raises(states):
    """A traced step skips PhiML's own convergence check; the oracle checks the projection itself."""
    oracle = KarmanOracle(KarmanSetup(nx=16, ny=32, cg_max_iter=2), backend="torch")
    with pytest.raises(OracleError, match="did not converge"):
        oracle.query(states, RE)
    assert oracle.rows_used == 0
