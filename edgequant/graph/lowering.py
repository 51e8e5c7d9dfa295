"""How a quantized graph lowers onto integer kernels: which computation each activation quantizer ends.

An output quantizer of a captured sim closes one fused integer kernel: ``act(base(inputs))`` where
``base`` is a conv/linear, an add, a global average pool, a concat or a pass-through op, and ``act``
an optional ReLU/ReLU6/clamp applied on the accumulator. The integer engine and the sim's
integer-exact mode both read the graph through these helpers, so they agree on what is fused.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn.clamp import ChannelClamp
from ..nn.quantizer import Quantizer
from . import ops

ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, ChannelClamp)
INTEGER_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear)


def module_of(n, modules):
    return modules.get(n.target) if isinstance(n, fx.Node) and n.op == "call_module" else None


def is_act(n, modules) -> bool:
    return isinstance(module_of(n, modules), ACT_MODULES) \
        or (n.op == "call_function" and n.target in (F.relu, torch.relu, F.relu6)) \
        or (n.op == "call_method" and n.target == "relu")


def split_producer(src, modules):
    """Split ``act(base(...))`` (looking through identity ops) into (base node, activation node or None)."""
    act = None
    while True:
        if is_act(src, modules) and act is None:
            act, src = src, src.args[0]
        elif ops.is_identity(src, modules):
            src = src.args[0]
        else:
            return src, act


def is_add(n) -> bool:
    return (n.op == "call_function" and n.target in (operator.add, torch.add)) or (n.op == "call_method" and n.target == "add")


def is_cat(n) -> bool:
    return n.op == "call_function" and n.target in (torch.cat, torch.concat)


def is_global_pool(n, modules) -> bool:
    m = module_of(n, modules)
    if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        osz = m.output_size if isinstance(m.output_size, (tuple, list)) else (m.output_size,)
        return all(o == 1 for o in osz)
    if n.op == "call_function" and n.target in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d):
        osz = n.args[1] if len(n.args) > 1 else n.kwargs.get("output_size")
        return all(o == 1 for o in (osz if isinstance(osz, (tuple, list)) else (osz,)))
    return (n.op == "call_method" and n.target == "mean") or (n.op == "call_function" and n.target is torch.mean)


def pool_dims(n, modules, ndim: int) -> tuple[list[int], bool]:
    """Reduced dimensions of a global average pool node and whether they are kept."""
    if module_of(n, modules) is not None or n.target in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d):
        return list(range(2, ndim)), True
    dims = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
    dims = [dims] if isinstance(dims, int) else list(dims)
    return dims, n.kwargs.get("keepdim", n.args[2] if len(n.args) > 2 else False)


def source_quantizer(n, modules, through=ops.keeps_grid):
    """The activation quantizer whose grid the value of node ``n`` is on, looking back through the ops
    ``through`` accepts (grid-keeping ops by default; ``ops.is_identity`` for the same shape), or None."""
    while isinstance(n, fx.Node):
        m = module_of(n, modules)
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
        m = module_of(act, modules)
        if isinstance(m, ChannelClamp):
            a, b = m.lo.double(), m.hi.double()
        elif isinstance(m, nn.Hardtanh):  # ReLU6 is a Hardtanh
            a, b = torch.full((channels,), float(m.min_val)), torch.full((channels,), float(m.max_val))
        elif act.target is F.relu6:
            a, b = torch.zeros(channels), torch.full((channels,), 6.0)
        else:
            a, b = torch.zeros(channels), torch.full((channels,), math.inf)
        big = 2 ** 40
        a_q = torch.round(a.double() / s_y).clamp(-big, big).long() + z_y
        b_q = torch.where(torch.isinf(b), torch.full_like(a_q, big), torch.round(b.double() / s_y).clamp(-big, big).long() + z_y)
        lo, hi = torch.maximum(lo, a_q.expand(channels)), torch.minimum(hi, b_q.expand(channels))
    shape = [1, -1] + [1] * (ndim - 2) if ndim > 2 else [1, -1]
    return lo.view(shape), hi.view(shape)
