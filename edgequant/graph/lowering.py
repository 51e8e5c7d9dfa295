"""How a quantized graph lowers onto integer kernels: which computation each activation quantizer ends.

An output quantizer of a captured sim closes one fused integer kernel: ``act(base(inputs))`` where
``base`` is a conv/linear, an add, a global average pool, a concat or a pass-through op, and ``act``
an optional ReLU/ReLU6/clamp applied on the accumulator. The integer engine and the sim's
integer-exact mode both read the graph through these helpers, so they agree on what is fused.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from ..nn.quantizer import Quantizer
from . import ops, patterns

INTEGER_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear)


def source_quantizer(n, modules, through=ops.keeps_grid):
    """The activation quantizer whose grid the value of node ``n`` is on, looking back through the ops
    ``through`` accepts (grid-keeping ops by default; ``ops.is_identity`` for the same shape), or None."""
    while isinstance(n, fx.Node):
        m = patterns.module_of(n, modules)
        if isinstance(m, Quantizer):
            return m
        if not through(n, modules):
            return None
        n = n.args[0]
    return None


def act_bounds(act, modules, s_y: float, z_y: int, qmin: int, qmax: int, channels: int, ndim: int):
    """Integer bounds ``[lo, hi]`` (int64, shaped to broadcast over an (N, C, ...) tensor) of the output grid
    intersected with the fused activation ``act`` (None: the grid only). ``round`` is monotonic, so
    clamping then quantizing equals quantizing then clamping at the mapped bounds."""
    lo = torch.full((channels,), qmin, dtype=torch.int64)
    hi = torch.full((channels,), qmax, dtype=torch.int64)
    if act is not None:
        a, b = (torch.as_tensor(v, dtype=torch.float64).expand(channels) for v in patterns.activation_bounds(act, modules))
        big = 2 ** 40
        a_q = torch.round(a / s_y).clamp(-big, big).long() + z_y
        b_q = torch.where(torch.isinf(b), torch.full_like(a_q, big), torch.round(b / s_y).clamp(-big, big).long() + z_y)
        lo, hi = torch.maximum(lo, a_q), torch.minimum(hi, b_q)
    shape = [1, -1] + [1] * (ndim - 2) if ndim > 2 else [1, -1]
    return lo.view(shape), hi.view(shape)
