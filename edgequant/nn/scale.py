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


class SigmoidMul(nn.Module):
    """SiLU written as ``x * sigmoid(x)``: traced as two ops, so the sigmoid's output gets its own quantizer
    and an integer runtime runs both on integers (ONNX Runtime's ``QLinearSigmoid`` and ``QLinearMul``)
    instead of SiLU in float between DequantizeLinear and QuantizeLinear.

    >>> x = torch.linspace(-3, 3, 7)
    >>> torch.allclose(SigmoidMul()(x), nn.SiLU()(x))
    True
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def split_silu(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` with every ``nn.SiLU`` replaced by :class:`SigmoidMul` (same float function). For
    EfficientNet-style models: their SiLUs then run as integer kernels in ONNX Runtime, at the cost of
    one more 8-bit rounding (the sigmoid's output) per SiLU."""
    import copy

    net = model if inplace else copy.deepcopy(model)
    for name, m in list(net.named_modules()):
        for child_name, child in list(m.named_children()):
            if type(child) is nn.SiLU:
                setattr(m, child_name, SigmoidMul())
    return net
