"""How many (scale, zero_point) pairs a tensor gets, and which elements share one.

Granularities follow ONNX QuantizeLinear:

* :class:`PerTensor` -- one pair for the whole tensor; ``scale.shape == ()``.
* :class:`PerChannel` -- one pair per index along ``axis``; ``scale.shape == (x.shape[axis],)``.
* :class:`PerBlock` -- blocks of ``block_size`` consecutive elements along ``axis``;
  ``scale.shape == x.shape`` with ``x.shape[axis]`` replaced by ``ceil(x.shape[axis] / block_size)``
  (the last block may be shorter).

``PerChannel(axis=None)`` / ``PerBlock(axis=None)`` mean "the layer's natural axis": the
output-channel axis of a weight (0 for Conv and Linear, 1 for ConvTranspose). QuantSim resolves it
per layer; the core functions need a concrete axis.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch


@dataclass(frozen=True)
class PerTensor:
    """One scale and zero point for the whole tensor."""

    def param_shape(self, shape: torch.Size) -> tuple[int, ...]:
        return ()


@dataclass(frozen=True)
class PerChannel:
    """One scale and zero point per index along ``axis`` (``None``: the layer's channel axis)."""

    axis: Optional[int] = None

    def __post_init__(self):
        if self.axis is not None and not isinstance(self.axis, int):
            raise TypeError(f"PerChannel axis must be an int or None, got {self.axis!r}")

    def param_shape(self, shape: torch.Size) -> tuple[int, ...]:
        return (shape[_norm_axis(self.axis, len(shape))],)


@dataclass(frozen=True)
class PerBlock:
    """One scale and zero point per block of ``block_size`` elements along ``axis``."""

    block_size: int = 32
    axis: Optional[int] = None

    def __post_init__(self):
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"PerBlock block_size must be a positive int, got {self.block_size!r}")
        if self.axis is not None and not isinstance(self.axis, int):
            raise TypeError(f"PerBlock axis must be an int or None, got {self.axis!r}")

    def param_shape(self, shape: torch.Size) -> tuple[int, ...]:
        axis = _norm_axis(self.axis, len(shape))
        out = list(shape)
        out[axis] = math.ceil(shape[axis] / self.block_size)
        return tuple(out)


Granularity = Union[PerTensor, PerChannel, PerBlock]


def _norm_axis(axis: Optional[int], ndim: int) -> int:
    if axis is None:
        raise ValueError(
            "granularity axis is None (meaning 'the layer's channel axis'); resolve it with "
            "edgequant.core.resolve_axis(granularity, axis) or pass a concrete axis, e.g. PerChannel(axis=0)"
        )
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a tensor with {ndim} dimensions")
    return axis % ndim


def check_granularity(g) -> Granularity:
    """Validate that ``g`` is a granularity *instance* (not the class)."""
    if isinstance(g, type) and g in (PerTensor, PerChannel, PerBlock):
        raise TypeError(f"use {g.__name__}() instead of {g.__name__}")
    if not isinstance(g, (PerTensor, PerChannel, PerBlock)):
        raise TypeError(f"granularity must be PerTensor(), PerChannel(axis) or PerBlock(block_size, axis), got {g!r}")
    return g


def resolve_axis(g: Granularity, default_axis: int) -> Granularity:
    """Return ``g`` with ``axis=None`` replaced by ``default_axis``."""
    if isinstance(g, PerChannel) and g.axis is None:
        return PerChannel(axis=default_axis)
    if isinstance(g, PerBlock) and g.axis is None:
        return PerBlock(block_size=g.block_size, axis=default_axis)
    return g


def expand_param(p: torch.Tensor, shape: torch.Size, g: Granularity) -> torch.Tensor:
    """Broadcast a scale/zero-point tensor of ``g.param_shape(shape)`` against a tensor of ``shape``."""
    if isinstance(g, PerTensor):
        return p
    ndim = len(shape)
    axis = _norm_axis(g.axis, ndim)
    if isinstance(g, PerChannel):
        view = [1] * ndim
        view[axis] = shape[axis]
        return p.reshape(view)
    # PerBlock: p has shape with dim `axis` == n_blocks; repeat each block's value block_size times.
    return p.repeat_interleave(g.block_size, dim=axis).narrow(axis, 0, shape[axis])


def to_groups(x: torch.Tensor, g: Granularity) -> torch.Tensor:
    """View ``x`` as ``(G, N)``: one row per (scale, zero_point) pair, in ``param_shape`` order.

    Blocks shorter than ``block_size`` (the last one when the axis length is not a multiple) are
    padded by repeating their last element, which leaves min, max and range searches unchanged.
    """
    if isinstance(g, PerTensor):
        return x.reshape(1, -1)
    axis = _norm_axis(g.axis, x.dim())
    if isinstance(g, PerChannel):
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)
    d = x.shape[axis]
    nb = math.ceil(d / g.block_size)
    xm = x.movedim(axis, -1)  # (..., D)
    pad = nb * g.block_size - d
    if pad:
        xm = torch.cat([xm, xm[..., -1:].expand(*xm.shape[:-1], pad)], dim=-1)
    # (..., nb, bs) -> rows ordered like param_shape moved to the end, i.e. (..., nb)
    rows = xm.reshape(*xm.shape[:-1], nb, g.block_size)
    return rows.reshape(-1, g.block_size)


def from_groups(v: torch.Tensor, shape: torch.Size, g: Granularity) -> torch.Tensor:
    """Inverse of the row order of :func:`to_groups`: a ``(G,)`` vector -> ``g.param_shape(shape)``."""
    if isinstance(g, (PerTensor, PerChannel)):
        return v.reshape(g.param_shape(shape))
    axis = _norm_axis(g.axis, len(shape))
    moved = list(shape)
    moved.pop(axis)
    moved.append(math.ceil(shape[axis] / g.block_size))
    return v.reshape(moved).movedim(-1, axis)
