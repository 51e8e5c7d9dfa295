"""``PaddedConv2d``: a conv whose zero padding differs per side (TensorFlow's "same" padding at stride 2).

``torch.nn.Conv2d`` pads both sides of a dimension alike; the convs of models ported from TensorFlow or JAX
(timm's ``Conv2dSame``, ``StdConv2dSame``) pad ``(0, 1)`` at stride 2 on even sizes, in their own forward. The
sim rewrites such a layer as this class (see :mod:`edgequant.graph.own_conv`), and every pass that reads a
conv's padding reads ``pads`` too: the ONNX export writes them in the Conv's ``pads`` attribute, AdaRound
pads its patches alike, the integer engine pads the input integers with their zero point.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class PaddedConv2d(nn.Conv2d):
    """``nn.Conv2d`` (``padding=0``) after ``F.pad(x, pads)``; ``pads`` is ``(left, right, top, bottom)``."""

    edgequant_layer = True  # not an own-forward layer to skip: the passes read ``pads``

    def __init__(self, *args, pads=(0, 0, 0, 0), **kwargs):
        super().__init__(*args, **kwargs)
        self.pads = tuple(int(p) for p in pads)

    def forward(self, x):
        return self._conv_forward(F.pad(x, self.pads), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pads={self.pads}"


def conv_pads(m: nn.Module) -> list[tuple[int, int]]:
    """``(begin, end)`` zero padding per spatial dimension of conv ``m``: explicit sizes, ``"valid"``, ``"same"``
    (stride 1; torch puts the odd one of each dimension's padding at its end) or a :class:`PaddedConv2d`'s pads."""
    if isinstance(m, PaddedConv2d):
        left, right, top, bottom = m.pads
        return [(top, bottom), (left, right)]
    k = list(m.kernel_size)
    if m.padding == "valid":
        return [(0, 0)] * len(k)
    if m.padding == "same":
        total = [d * (kk - 1) for d, kk in zip(m.dilation, k)]
        return [(t // 2, t - t // 2) for t in total]
    return [(p, p) for p in m.padding]
