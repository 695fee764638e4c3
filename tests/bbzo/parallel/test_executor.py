"""Executors and the codec of the distributed step: shards, the serial split, messages that round-trip."""

import pytest
import torch

import bbzo
from bbzo.adapters import FunctionalAdapter
from bbzo.parallel import SerialExecutor, as_executor, assign_shards, codec
from bbzo.step import Request
from tests.helpers import ce_loss, cnn_bn64


def _probes(params):
    est = bbzo.create_estimator("cge")
    return est.ask(params, est.init(params))[0].probes


def test_shards_deal_every_probe_once_and_balance_each_tensor():
    params = {"a": torch.zeros(10), "b": torch.zeros(3, 3), "c": torch.zeros(1)}
    probes = _probes(params)
    parts = assign_shards(probes, 3)
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(len(probes)))
    for name, rows in probes.tensor_groups():  # every rank gets a third of every tensor's probes, up to one
        counts = [int(torch.isin(p, rows).sum()) for p in parts]
        assert max(counts) - min(counts) <= 1, (name, counts)
    assert [len(p) for p in parts] == [6, 7, 7]  # the odd probes go to ranks 1, 2 first: rank 0 has the base
    # whole batched calls of 4, dealt round-robin from rank 1 (rank 0 also evaluates the base)
    parts = assign_shards(probes, 2, quantum=4)
    assert [p[:4].tolist() for p in parts] == [[4, 5, 6, 7], [0, 1, 2, 3]]
    with pytest.raises(bbzo.ConfigError, match=">= 1"):
        assign_shards(probes, 0)


def test_serial_shards_give_the_numbers_of_one_shard_and_count_every_query():
    model = cnn_bn64().train()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    params = {n: p.detach() for n, p in model.named_parameters()}
    request = Request(_probes(params), base=True)
    ev1 = FunctionalAdapter(model).bind(ce_loss, x, y)
    one = SerialExecutor(1).evaluate(ev1, request)
    ev3 = FunctionalAdapter(model).bind(ce_loss, x, y)
    three = SerialExecutor(3).evaluate(ev3, request)
    torch.testing.assert_close(three.losses, one.losses, rtol=0, atol=1e-13)
    torch.testing.assert_close(three.base, one.base, rtol=0, atol=0)
    assert one.spent.queries == three.spent.queries == len(request.probes) + 1 == ev3.ledger.queries
    assert isinstance(as_executor(None), SerialExecutor) and as_executor(4).n_shards == 4
    with pytest.raises(bbzo.ConfigError, match="number of shards"):
        as_executor("two")


def test_the_codec_round_trips_named_fields_and_pads():
    layout = [("status", 1), ("losses", 3), ("none", 0), ("grads", 2)]
    msg = codec.pack(layout, {"status": 1, "losses": torch.tensor([0.5, -1.0, 2.0]), "grads": [3.0, 4.0]}, 8)
    assert msg.shape == (8,) and torch.isnan(msg[6:]).all()  # padded to the longest rank's message
    got = codec.unpack(layout, msg)
    assert got["losses"].tolist() == [0.5, -1.0, 2.0] and got["grads"].tolist() == [3.0, 4.0] and got["none"].numel() == 0
    assert float(got["status"]) == 1.0
    partial = codec.unpack(layout, codec.pack(layout, {"status": 0}, 6))  # a failed rank sends only its status
    assert torch.isnan(partial["losses"]).all()
    with pytest.raises(ValueError, match="has 2 values, the layout says 3"):
        codec.pack(layout, {"losses": [1.0, 2.0]}, 8)
    with pytest.raises(ValueError, match="needs 6 values"):
        codec.pack(layout, {}, 5)
