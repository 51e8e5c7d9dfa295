"""Arithmetic that changes nothing, taken out of a captured graph: ``x * 1``, ``x / 1``, ``x + 0``, ``x - 0``.

NF-ResNets scale each block's input by ``beta``, which is 1.0 for the first block of a stage. Kept, such a node
gets a quantizer of its own: the value is rounded twice (a ReLU's unsigned grid, then a signed grid with half its
resolution), and ONNX Runtime, which removes the no-op and then merges the two Q/DQ pairs into one with a grid of
its own, no longer computes what the sim simulated. Removed, the value keeps its producer's grid. Exact in float:
``x * 1.0`` and ``x + 0.0`` are ``x``.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

#: op -> (neutral constant, whether the constant may come first)
_NEUTRAL = {operator.mul: (1, True), torch.mul: (1, True), "mul": (1, True),
            operator.truediv: (1, False), torch.div: (1, False), "div": (1, False),
            operator.add: (0, True), torch.add: (0, True), "add": (0, True),
            operator.sub: (0, False), torch.sub: (0, False), "sub": (0, False)}


def _data(n: fx.Node):
    """The tensor ``n`` returns unchanged, or None."""
    if n.op not in ("call_function", "call_method") or n.kwargs or len(n.args) != 2:
        return None
    neutral, either = _NEUTRAL.get(n.target, (None, False))
    if neutral is None:
        return None
    a, b = n.args
    if isinstance(a, fx.Node) and type(b) in (int, float) and b == neutral:
        x = a
    elif either and isinstance(b, fx.Node) and type(a) in (int, float) and a == neutral:
        x = b
    else:
        return None
    mx, mn = x.meta.get("tensor_meta"), n.meta.get("tensor_meta")
    same = (mx is not None and mn is not None and getattr(mx, "dtype", None) is not None and mx.dtype.is_floating_point
            and mx.dtype == mn.dtype and tuple(mx.shape) == tuple(mn.shape))
    return x if same else None


def drop_noops(gm: fx.GraphModule) -> int:
    """Remove the no-op arithmetic of a shape-propagated graph (see the module docstring): only float tensors whose
    shape and dtype the op keeps. Returns how many nodes went."""
    count = 0
    for n in list(gm.graph.nodes):
        x = _data(n)
        if x is None:
            continue
        n.replace_all_uses_with(x)
        gm.graph.erase_node(n)
        count += 1
    if count:
        gm.recompile()
    return count
