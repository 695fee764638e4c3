"""Executors and the codec of the distributed step: shards, the serial split, messages that round-trip."""

import pytest
import torch

import bbzo
from bbzo.adapters import FunctionalAdapter, make_adapter
from bbzo.parallel import SerialExecutor, as_executor, codec, deal
from bbzo.step import Request
from tests.helpers import ce_loss, cnn_bn64


def _probes(params):
    est = bbzo.create_estimator("cge")
    return est.ask(params, est.init(params))[0].probes


def test_whole_chunks_are_dealt_in_turn_within_each_cost_class():
    chunks = [(0, torch.arange(0, 4)), (0, torch.arange(4, 8)), (0, torch.arange(8, 10)),
              (3, torch.arange(10, 12)), (3, torch.arange(12, 14)), (-1, torch.arange(14, 15))]
    parts = deal(chunks, 2)
    # class 0: ranks 1, 0, 1; the turn carries on: class 3 to ranks 0, 1; class -1 to rank 0 (rank 0 has the base)
    assert parts[1].tolist() == [0, 1, 2, 3, 8, 9, 12, 13] and parts[0].tolist() == [4, 5, 6, 7, 10, 11, 14]
    assert [p.tolist() for p in deal(chunks, 1)] == [list(range(15))]
    with pytest.raises(bbzo.ConfigError, match=">= 1"):
        deal(chunks, 0)


@pytest.mark.parametrize("feature_reuse", [False, True])
def test_a_shard_of_whole_chunks_is_evaluated_bitwise_as_in_the_whole_batch(feature_reuse):
    """Sparse coordinates of a staged CNN at batch 3 (where a different batch composition changes float rounding):
    every shard of 3 gives exactly the per-sample losses the serial evaluation gives."""
    torch.manual_seed(0)
    model = cnn_bn64().train().float()
    x, y = torch.randn(3, 3, 8, 8), torch.randint(0, 3, (3,))
    params = {n: p.detach() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    coords = {n: torch.randperm(p.numel(), generator=g)[:max(1, p.numel() // 3)] for n, p in params.items()}
    est = bbzo.create_estimator("sparse_cge", coords=coords)
    request = est.ask(params, est.init(params))[0]
    adapter = make_adapter(model, feature_reuse=feature_reuse, max_chunk=5)
    whole = SerialExecutor(1).evaluate(adapter.bind(ce_loss, x, y), Request(request.probes, per_sample=True))
    ev = adapter.bind(ce_loss, x, y)
    chunks = ev.chunks(request.probes)
    assert len(chunks) > 6 and len({c for c, _ in chunks}) > (1 if feature_reuse else 0)
    for rows in deal(chunks, 3):
        part = ev.probe_losses(request.probes.select(rows))
        assert torch.equal(part, whole.per_sample[rows])
    three = SerialExecutor(3).evaluate(adapter.bind(ce_loss, x, y), Request(request.probes, per_sample=True))
    assert torch.equal(three.per_sample, whole.per_sample)


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
