"""Light augmentation for distillation on a few calibration images (the CLI's ``--qat-steps``)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def light_augment(x: torch.Tensor, generator: Optional[torch.Generator] = None, min_side: float = 0.8) -> torch.Tensor:
    """Per image: a random square-ish crop of ``min_side``..100% of each side, resized back, and a
    horizontal flip half of the time. ``x``: ``(N, C, H, W)`` float images (any normalization); other
    inputs are returned as they are.

    >>> light_augment(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 3, 32, 32])
    """
    if not torch.is_tensor(x) or x.ndim != 4 or not x.is_floating_point():
        return x
    n, _, h, w = x.shape
    g = generator
    out = torch.empty_like(x)
    for i in range(n):
        f = min_side + (1 - min_side) * torch.rand((), generator=g).item()
        ch, cw = max(1, int(h * f)), max(1, int(w * f))
        top = int(torch.randint(0, h - ch + 1, (), generator=g))
        left = int(torch.randint(0, w - cw + 1, (), generator=g))
        crop = x[i:i + 1, :, top:top + ch, left:left + cw]
        if (ch, cw) != (h, w):
            crop = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        out[i] = crop[0].flip(-1) if torch.rand((), generator=g).item() < 0.5 else crop[0]
    return out
