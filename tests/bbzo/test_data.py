"""Minibatches are a pure function of (seed, step): a resumed run sees exactly the batches it would have seen."""

import pytest
import torch

import bbzo
from bbzo.data import EpochOrder


def test_epoch_order_is_a_permutation_per_epoch_and_a_function_of_the_step():
    order = EpochOrder(10, 3, seed=4)
    assert order.steps_per_epoch == 3  # the last partial batch is dropped
    epoch0 = torch.cat([order.indices(s) for s in range(3)])
    assert len(set(epoch0.tolist())) == 9
    again = EpochOrder(10, 3, seed=4)
    assert torch.equal(again.indices(4), order.indices(4)) and not torch.equal(order.indices(0), order.indices(3))
    assert EpochOrder(10, 3, shuffle=False).indices(1).tolist() == [3, 4, 5]


def test_tensor_batches_check_their_inputs():
    x, y = torch.arange(12.0).view(6, 2), torch.arange(6)
    b = bbzo.TensorBatches(x, y, 2, seed=1)
    xb, yb = b.get_batch(5)
    assert torch.equal(x[yb], xb)  # inputs and targets stay paired
    with pytest.raises(bbzo.ShapeError, match="6 rows but targets 5"):
        bbzo.TensorBatches(x, y[:5], 2)
    with pytest.raises(bbzo.ConfigError, match=r"batch_size must be in \[1, 6\]"):
        bbzo.TensorBatches(x, y, 7)
