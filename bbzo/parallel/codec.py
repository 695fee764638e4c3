"""A small codec for the one collective of a distributed step: named float64 fields in one flat vector.

Every rank knows every rank's layout in advance (the probes are dealt deterministically, the batch size and
the request are the same everywhere), so a message is just the fields' values in layout order, padded to
the longest rank's length for ``all_gather``. Integers (counts, status codes) travel as float64, exact up
to 2**53.
"""

from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch

__all__ = ["Layout", "pack", "unpack", "size"]

#: ``[(field name, number of values), ...]`` in message order.
Layout = Sequence[tuple[str, int]]


def pack(layout: Layout, values: Mapping[str, Union[torch.Tensor, float, int, Sequence[float]]],
         length: int) -> torch.Tensor:
    """The ``(length,)`` float64 message: each field of ``layout`` from ``values`` (missing fields are NaN)."""
    out = torch.full((length,), float("nan"), dtype=torch.float64)
    o = 0
    for name, n in layout:
        if name in values and n:
            v = torch.as_tensor(values[name], dtype=torch.float64).reshape(-1)
            if v.numel() != n:
                raise ValueError(f"codec: field {name!r} has {v.numel()} values, the layout says {n}")
            out[o:o + n] = v.cpu()
        o += n
    if o > length:
        raise ValueError(f"codec: the layout needs {o} values, the message holds {length}")
    return out


def unpack(layout: Layout, message: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{field name: (n,) float64}`` views into ``message``, as :func:`pack` laid them out."""
    out: dict[str, torch.Tensor] = {}
    o = 0
    for name, n in layout:
        out[name] = message[o:o + n]
        o += n
    return out


def size(layout: Layout) -> int:
    return sum(n for _, n in layout)
