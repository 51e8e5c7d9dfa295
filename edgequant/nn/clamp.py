"""``ChannelClamp``: a clamp whose bounds differ per channel.

Cross-layer equalization divides output channel ``c`` of a layer by ``s_c``. A ReLU commutes with
that scaling, but ReLU6 does not: ``relu6(x) / s = clamp(x / s, 0, 6 / s)``. Replacing the ReLU6 by a
clamp with per-channel bounds keeps the float model exact (AIMET instead skips such pairs, or asks for
ReLU6 to be swapped for ReLU, which changes the model). An integer kernel applies it on the int32
accumulator like any fused clamp; the ONNX export applies it as ``Max``/``Min`` with per-channel integer
bounds on the output quantizer's integers (the same values, as rounding is monotonic), so ONNX Runtime
still fuses the layer before it into its integer kernel.
"""
from __future__ import annotations

import torch
from torch import nn


class ChannelClamp(nn.Module):
    r"""``y = min(max(x, lo_c), hi_c)`` along ``channel_axis`` (1 by default: ``(N, C, ...)``).

    >>> m = ChannelClamp(torch.tensor([0.0, -1.0]), torch.tensor([6.0, 1.0]))
    >>> m(torch.tensor([[7.0, -3.0], [-2.0, 0.5]])).tolist()
    [[6.0, -1.0], [0.0, 0.5]]
    """

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor, channel_axis: int = 1):
        super().__init__()
        lo, hi = torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32)
        if lo.ndim != 1 or lo.shape != hi.shape:
            raise ValueError(f"lo and hi must be 1-D tensors of the same length, got {tuple(lo.shape)} and {tuple(hi.shape)}")
        if bool((lo > hi).any()):
            raise ValueError("ChannelClamp needs lo <= hi in every channel")
        self.channel_axis = channel_axis
        self.register_buffer("lo", lo.clone())
        self.register_buffer("hi", hi.clone())

    @classmethod
    def from_module(cls, act: nn.Module, channels: int) -> "ChannelClamp":
        """The per-channel equivalent of ``nn.ReLU``, ``nn.ReLU6`` or ``nn.Hardtanh``."""
        if isinstance(act, nn.Hardtanh):  # nn.ReLU6 is a Hardtanh(0, 6)
            lo, hi = float(act.min_val), float(act.max_val)
        elif isinstance(act, nn.ReLU):
            lo, hi = 0.0, float("inf")
        else:
            raise TypeError(f"no per-channel clamp for {type(act).__name__}")
        return cls(torch.full((channels,), lo), torch.full((channels,), hi))

    @property
    def nonneg(self) -> bool:
        return bool((self.lo >= 0).all())

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.ndim
        shape[self.channel_axis] = -1
        return t.view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.maximum(x, self._view(self.lo, x)), self._view(self.hi, x))

    def extra_repr(self) -> str:
        return f"channels={self.lo.numel()}, lo={self.lo.min().item():.3g}..{self.lo.max().item():.3g}, " \
               f"hi={self.hi.min().item():.3g}..{self.hi.max().item():.3g}"
