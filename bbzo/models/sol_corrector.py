"""The solver-in-the-loop corrector (Um et al. 2020; DeepZero §6.2, Appendix H).

A 5x5 conv net ``(u, v, Re) -> (du, dv)``: input divided by ``in_scale``, output times ``out_scale``.
``CORRECTOR_CHANNELS["paper"] = (32, 64)`` is the paper's network (3 -> 32 -> 64 -> 2, 56,898
parameters); ``small`` (16, 16; 8,434) and ``tiny`` (8, 8; 2,618) are CPU-sized. The last layer starts
at zero, so training starts from "no correction" (exactly the solver alone) instead of from a random
correction that first has to be unlearned (measured: a default-initialised corrector starts 50x worse).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .registry import register_model

__all__ = ["Corrector", "CORRECTOR_CHANNELS", "sol_corrector"]

CORRECTOR_CHANNELS = {"paper": (32, 64), "small": (16, 16), "tiny": (8, 8)}


class Corrector(nn.Module):
    """``(N, 3, ny, nx)`` raw (u, v, Re) -> ``(N, 2, ny, nx)`` correction in velocity units (an ``nn.Sequential`` inside)."""

    def __init__(self, channels: tuple[int, ...], in_scale: torch.Tensor, out_scale: torch.Tensor,
                 kernel: int = 5, zero_last: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for h in channels:
            layers += [nn.Conv2d(c, h, kernel, padding=kernel // 2), nn.ReLU()]
            c = h
        layers.append(nn.Conv2d(c, 2, kernel, padding=kernel // 2))
        self.net = nn.Sequential(*layers)
        if zero_last:
            with torch.no_grad():
                layers[-1].weight.zero_()
                layers[-1].bias.zero_()
        self.register_buffer("in_scale", torch.as_tensor(in_scale, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("out_scale", torch.as_tensor(out_scale, dtype=torch.float32).view(1, 2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x / self.in_scale) * self.out_scale


@register_model("sol_corrector", "ZO-SOL corrector (u, v, Re) -> (du, dv): 5x5 convs, size tiny/small/paper (2,618 / 8,434 / 56,898 params)")
def sol_corrector(size: str = "paper", in_scale: Optional[torch.Tensor] = None, out_scale: Optional[torch.Tensor] = None,
                  zero_last: bool = True) -> Corrector:
    if size not in CORRECTOR_CHANNELS:
        from ..errors import ConfigError
        raise ConfigError(f"corrector size must be one of {', '.join(CORRECTOR_CHANNELS)}, got {size!r}.")
    return Corrector(CORRECTOR_CHANNELS[size], torch.ones(3) if in_scale is None else in_scale,
                     torch.ones(2) if out_scale is None else out_scale, zero_last=zero_last)
