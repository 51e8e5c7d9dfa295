r"""Lookup tables: an elementwise function of one quantized tensor, as a table from code to code.

When ``y = f(x)`` is applied value by value and both ``x`` and ``y`` sit on per-tensor grids, ``f`` has only
as many inputs as ``x``'s grid has codes (256 at 8 bits). Its table
``t[q - qmin] = quantize_y(f(dequantize_x(q)))`` then *is* the quantized op: the sim's integer-exact mode,
the integer engine and the ONNX export (a ``Gather``) all index the same table, so they agree bit for bit
however the float function is implemented (ONNX Runtime's float kernels round differently from torch's in
the last bit), and the deployed model runs no float op for it. Integer kernels do the same for
sigmoid, tanh and hard-swish (TFLite, ONNX Runtime's ``QLinearSigmoid``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Grid:
    """A per-tensor integer grid ``(scale, zero_point, qmin, qmax)``."""
    scale: float
    zero_point: int
    qmin: int
    qmax: int

    def quantize(self, v: torch.Tensor) -> torch.Tensor:
        """``clamp(rne(v / s) + z)`` in float32, as int64."""
        s = torch.tensor(self.scale, dtype=torch.float32, device=v.device)
        return torch.clamp(torch.round(v.float() / s) + self.zero_point, self.qmin, self.qmax).long()

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        """``fp32(q - z) * s``."""
        return (q - self.zero_point).float() * torch.tensor(self.scale, dtype=torch.float32, device=q.device)


def table(fn: Callable, src: Grid, dst: Grid, device=None) -> torch.Tensor:
    """``dst.quantize(fn(src.dequantize(q)))`` for every code ``q`` of ``src`` (int64, indexed by ``q - src.qmin``).

    Raises ``ValueError`` when ``fn`` is NaN on a code (``sqrt`` of a negative value): no code stands for it."""
    codes = torch.arange(src.qmin, src.qmax + 1, dtype=torch.int64, device=device)
    y = fn(src.dequantize(codes))
    if torch.isnan(y).any():
        raise ValueError("the function is NaN on some codes of its input grid; it has no table")
    return dst.quantize(y)


def lookup(t: torch.Tensor, q: torch.Tensor, src: Grid) -> torch.Tensor:
    """The activation's integers for the pre-activation integers ``q`` (on ``src``) through table ``t``."""
    return t[q - src.qmin]
