"""The conv census that ``benchmarks/cge_throughput.py`` reports where its time goes with."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from convs import ConvCensus  # noqa: E402


def test_the_census_counts_every_conv2d_call_with_its_flops_and_restores_conv2d():
    orig = F.conv2d
    strided = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
    x = torch.randn(2, 3, 16, 16)
    t0 = time.perf_counter()
    with ConvCensus() as census:
        y = grouped(strided(x))
        F.conv2d(y, torch.randn(4, 8, 1, 1))
    wall = time.perf_counter() - t0
    assert F.conv2d is orig
    # 2 * outputs * (in channels per group) * kh * kw for each call
    want = 2 * (2 * 8 * 8 * 8) * 3 * 9 + 2 * (2 * 8 * 8 * 8) * 2 * 9 + 2 * (2 * 4 * 8 * 8) * 8
    assert census.flops == want
    assert sum(c for c, _, _ in census.calls.values()) == 3
    strided_key = next(k for k in census.calls if k[1] == (8, 3, 3, 3))
    assert strided_key[2] == (2, 2) and strided_key[3] == (1, 1) and strided_key[5] == 1
    assert 0 < census.seconds <= wall  # the timed convolutions are a part of the measured block
    alone = census.standalone_seconds(torch.device("cpu"), reps=1)
    assert 0 < alone < 100 * wall


def test_the_census_restores_conv2d_when_the_measured_code_raises():
    orig = F.conv2d
    with pytest.raises(RuntimeError), ConvCensus():
        F.conv2d(torch.randn(1, 3, 4, 4), torch.randn(2, 4, 3, 3))  # 4 input channels: a shape error
    assert F.conv2d is orig
