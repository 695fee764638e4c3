"""Where the time of an evaluation goes: a census of every ``F.conv2d`` call it makes (FLOPs, time, shapes).

``ConvCensus`` wraps ``torch.nn.functional.conv2d`` while it is active (``nn.Conv2d`` and bbzo's own
grouped convolutions call it through the module attribute), so it sees every convolution of a forward or
of a bbzo estimate. ``standalone_seconds`` times each recorded shape again on its own, with fresh inputs, which
gives the cost of the same convolutions with nothing else around them: a floor for any exact evaluation
that runs these convolutions with these kernels.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Any, Callable

import torch
import torch.nn.functional as F

Key = tuple[tuple[int, ...], tuple[int, ...], tuple, tuple, tuple, int, bool]


class ConvCensus:
    """Context manager: counts, times (wall, with ``sync`` around each call) and sums the FLOPs of ``F.conv2d`` calls.

    Attributes:
        calls: ``{key: [count, seconds, flops]}``; a key is (input shape, weight shape, stride, padding,
            dilation, groups, input channels-last).
    """

    def __init__(self, sync: Callable[[], None] = lambda: None) -> None:
        self.sync = sync
        self.calls: dict[Key, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
        self._orig: Any = None

    def __enter__(self) -> "ConvCensus":
        self._orig = F.conv2d
        orig, sync = self._orig, self.sync

        def conv2d(inp, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
            sync()
            t = time.perf_counter()
            out = orig(inp, weight, bias, stride, padding, dilation, groups)
            sync()
            dt = time.perf_counter() - t
            key = (tuple(inp.shape), tuple(weight.shape), _pair(stride), _pair(padding), _pair(dilation), groups,
                   inp.dim() == 4 and inp.is_contiguous(memory_format=torch.channels_last)
                   and not inp.is_contiguous())
            rec = self.calls[key]
            rec[0] += 1
            rec[1] += dt
            rec[2] += 2.0 * out.numel() * weight.shape[1] * weight.shape[2] * weight.shape[3]
            return out

        F.conv2d = conv2d
        return self

    def __exit__(self, *exc: Any) -> None:
        F.conv2d = self._orig

    @property
    def seconds(self) -> float:
        return sum(r[1] for r in self.calls.values())

    @property
    def flops(self) -> float:
        return sum(r[2] for r in self.calls.values())

    def standalone_seconds(self, device: torch.device, reps: int = 5) -> float:
        """The recorded convolutions, each shape timed alone (median of ``reps``, after a warm-up) times its count.

        Call it outside the ``with`` block."""
        total = 0.0
        sync = self.sync
        for (shape, wshape, stride, padding, dilation, groups, cl), (count, _, _) in self.calls.items():
            x = torch.randn(shape, device=device)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            w = torch.randn(wshape, device=device)
            ts = []
            with torch.no_grad():
                for i in range(reps + 1):
                    sync()
                    t = time.perf_counter()
                    F.conv2d(x, w, None, stride, padding, dilation, groups)
                    sync()
                    if i:
                        ts.append(time.perf_counter() - t)
            total += count * statistics.median(ts)
        return total


def _pair(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
