"""``ChannelScale``: a constant per-channel factor on the last axis (the division of input smoothing)."""
from __future__ import annotations

import torch
from torch import nn


class ChannelScale(nn.Module):
    r"""``y = x * scale`` with ``scale`` along the last axis (the features of a token).

    >>> ChannelScale(torch.tensor([0.5, 2.0]))(torch.ones(1, 3, 2)).tolist()
    [[[0.5, 2.0], [0.5, 2.0], [0.5, 2.0]]]
    """

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        scale = torch.as_tensor(scale, dtype=torch.float32)
        if scale.ndim != 1 or not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise ValueError("ChannelScale needs a 1-D tensor of finite positive factors")
        self.register_buffer("scale", scale.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def extra_repr(self) -> str:
        return f"{self.scale.numel()} channels"
