"""The float step of attention between its two matrix products, written once.

Scaled dot-product attention is ``softmax(q @ k^T * scale + mask) @ v``. Quantized, its two products are
integer kernels (``QLinearMatMul``: both inputs on 8-bit grids) and the step between them is float:
:func:`attention_softmax` takes the quantized scores ``q @ k^T`` and returns the probabilities, which get
one quantizer of their own (unsigned: they lie in [0, 1]). Scale and mask sit inside that one step, so the
scores are rounded once (a separate ``* scale`` would round them a second time on a grid of its own), and a
mask (0 / -inf, or a boolean) never reaches a grid.

>>> import torch
>>> s = torch.tensor([[[0.0, 2.0, 4.0]]])
>>> attention_softmax(s, 0.5, torch.tensor([True, True, False])).tolist()
[[[0.2689414322376251, 0.7310585975646973, 0.0]]]
"""
from __future__ import annotations

from typing import Optional

import torch


def attention_softmax(scores: torch.Tensor, scale: Optional[float] = None, mask: Optional[torch.Tensor] = None,
                      causal: bool = False) -> torch.Tensor:
    """``softmax(scores * scale + mask)`` over the last axis, as ``F.scaled_dot_product_attention`` computes it
    between its products: a boolean ``mask`` keeps the positions where it is True, a float one is added;
    ``causal`` keeps position ``j <= i`` only (the top-left aligned lower triangle)."""
    if scale is not None and scale != 1:
        scores = scores * scale
    if causal:
        rows, cols = scores.shape[-2], scores.shape[-1]
        keep = torch.ones(rows, cols, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores, -1)
