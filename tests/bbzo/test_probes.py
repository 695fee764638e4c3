"""Probes are plain data: slicing and selecting keep probe order, stacks move exactly the coordinates asked for."""

import pytest
import torch

from bbzo.probes import BlockProbes, CoordinateProbes, DirectionProbes, OutputProbes, make_direction


def test_coordinate_probes_stack_moves_one_coordinate_each_and_slices_keep_order():
    params = {"a": torch.zeros(2, 3, dtype=torch.float64), "b": torch.ones(4, dtype=torch.float64)}
    probes = CoordinateProbes(("a", "b"), torch.tensor([0, 1, 0]), torch.tensor([5, 2, 0]),
                              torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
    stacked = probes.stack(params)
    assert stacked["a"].shape == (3, 2, 3) and stacked["b"].shape == (3, 4)
    assert stacked["a"][0].flatten()[5] == 0.1 and stacked["a"][2].flatten()[0] == 0.3
    assert float(stacked["a"].abs().sum()) == pytest.approx(0.4)  # nothing else moved
    assert stacked["b"][1].tolist() == [1.0, 1.0, 0.8, 1.0] and stacked["b"][0].tolist() == [1.0] * 4
    assert [(n, r.tolist()) for n, r in probes.tensor_groups()] == [("a", [0, 2]), ("b", [1])]
    sub = probes.select(torch.tensor([2, 0]))
    assert sub.index.tolist() == [0, 5] and sub.delta.tolist() == [0.3, 0.1] and len(probes.slice(1, 3)) == 2
    assert probes.touched_bytes(params) == 6 * 8


def test_direction_probes_regenerate_the_same_direction_anywhere():
    shapes = (torch.Size([3]), torch.Size([2, 2]))
    probes = DirectionProbes(("a", "b"), shapes, seed=7, dirs=torch.tensor([0, 1]),
                             delta=torch.tensor([1e-2, 1e-2], dtype=torch.float64), distribution="gaussian")
    params = {"a": torch.zeros(3, dtype=torch.float64), "b": torch.zeros(2, 2, dtype=torch.float64)}
    stacked = probes.stack(params)
    u1 = make_direction(7, 1, shapes, "gaussian")
    torch.testing.assert_close(stacked["b"][1], 1e-2 * u1[1])
    torch.testing.assert_close(probes.select(torch.tensor([1])).stack(params)["a"][0], stacked["a"][1])
    assert probes.tensor_groups() is None  # every probe moves every tensor
    sphere = make_direction(7, 0, shapes, "sphere")
    assert float(torch.cat([t.flatten() for t in sphere]).norm()) == pytest.approx(7 ** 0.5)
    per_tensor = make_direction(7, 0, shapes, "tensor_sphere")
    assert [round(float(t.norm()), 12) for t in per_tensor] == [1.0, 1.0]
    with pytest.raises(ValueError, match="unknown direction distribution"):
        make_direction(7, 0, shapes, "cauchy")


def test_block_probes_check_their_shapes():
    with pytest.raises(ValueError, match=r"dirs must be \(M, n\)"):
        BlockProbes(("w",), 0, torch.zeros(3), torch.zeros(3, dtype=torch.float64))
    b = BlockProbes(("w",), 0, torch.eye(2, dtype=torch.float64), torch.tensor([1.0, -1.0], dtype=torch.float64))
    assert b.stack({"w": torch.zeros(2, dtype=torch.float64)})["w"].tolist() == [[1.0, 0.0], [0.0, -1.0]]


def test_output_probes_move_every_sample_at_once():
    coord = OutputProbes("coordinate", torch.tensor([2, 0]), torch.tensor([0.5, -0.5], dtype=torch.float64), width=3)
    pert = coord.perturbations(4, torch.float32, "cpu")
    assert pert.shape == (2, 4, 3) and pert.dtype == torch.float32
    assert pert[0, :, 2].tolist() == [0.5] * 4 and float(pert[0, :, :2].abs().sum()) == 0
    assert pert[1, :, 0].tolist() == [-0.5] * 4
    gauss = OutputProbes("gaussian", torch.tensor([4, 9]), torch.tensor([1.0, 1.0], dtype=torch.float64), width=3, seed=5)
    p = gauss.perturbations(6, torch.float64, "cpu")
    torch.testing.assert_close(p[1], gauss.direction(9, 6))  # regenerated from (seed, direction), per sample
    assert not torch.allclose(p[1][0], p[1][1])  # independent directions per sample
    torch.testing.assert_close(gauss.select(torch.tensor([1])).perturbations(6, torch.float64, "cpu")[0], p[1])
    with pytest.raises(ValueError, match="kind must be one of"):
        OutputProbes("sparse", torch.tensor([0]), torch.tensor([1.0]), width=1)
    with pytest.raises(ValueError, match="out of range for width 3"):
        OutputProbes("coordinate", torch.tensor([3]), torch.tensor([1.0]), width=3).perturbations(2, torch.float64, "cpu")
