"""Graph clean-ups after capture: arithmetic that changes nothing, and in-place writes made functional.

:func:`drop_noops` takes out ``x * 1``, ``x / 1``, ``x + 0``, ``x - 0``, and the empty inputs of a concatenation
(a Hugging Face key/value cache starts as an empty tensor of shape ``(0,)``, which ``torch.cat`` skips but ONNX's
``Concat`` rejects: its rank differs).

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

from . import ops

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


_CATS = (torch.cat, torch.concat, "cat")


def _empty(n) -> bool:
    meta = n.meta.get("tensor_meta") if isinstance(n, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return shape is not None and any(int(d) == 0 for d in shape)


def _drop_empty_cat_inputs(n: fx.Node) -> bool:
    """Take the empty tensors out of a concatenation's inputs (they add nothing); True when it changed."""
    if n.op not in ("call_function", "call_method") or n.target not in _CATS or not n.args:
        return False
    parts = n.args[0]
    if not isinstance(parts, (list, tuple)) or _empty(n):
        return False
    kept = [p for p in parts if not _empty(p)]
    if len(kept) == len(parts) or not kept:
        return False
    n.args = (type(parts)(kept),) + tuple(n.args[1:])
    for p in parts:
        if isinstance(p, fx.Node) and p.op == "get_attr" and not p.users:
            n.graph.erase_node(p)
    return True


def drop_noops(gm: fx.GraphModule) -> int:
    """Remove the no-op arithmetic of a shape-propagated graph (see the module docstring): only float tensors whose
    shape and dtype the op keeps, and empty concatenation inputs. Returns how many nodes went or changed."""
    count = 0
    for n in list(gm.graph.nodes):
        if _drop_empty_cat_inputs(n):
            count += 1
            if len(n.args[0]) == 1 and _shape(n.args[0][0]) == _shape(n):
                n.replace_all_uses_with(n.args[0][0])
                gm.graph.erase_node(n)
            continue
        x = _data(n)
        if x is None:
            continue
        n.replace_all_uses_with(x)
        gm.graph.erase_node(n)
        count += 1
    if count:
        gm.recompile()
    return count


_COPIES = ("copy_", torch.ops.aten.copy_.default, torch.Tensor.copy_)


def _view(n, reader: fx.Node, write: fx.Node, order: dict) -> bool:
    """Whether ``n`` is a selection that ``write`` writes through (``reader``, the next link of the chain, reads it):
    its other readers all run before the write."""
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target is operator.getitem):
        return False
    return all(u is reader or order.get(u, -1) < order.get(write, 0) for u in n.users)


def _write(n: fx.Node, order: dict):
    """``(base, [(tensor, index), ...], values)`` when ``n`` writes ``values`` in place into a selection of ``base``:
    ``t[idx] = v`` (fx's ``setitem``), ``t[i][j].copy_(v)`` (torch.export keeps writes as ``copy_`` into chains of
    selections) or ``t.copy_(v)``; the list holds each selection from ``base`` outwards. None otherwise."""
    if n.op not in ("call_function", "call_method") or n.users or n.kwargs:
        return None
    if n.target is operator.setitem and len(n.args) == 3:
        return n.args[0], [(n.args[0], n.args[1])], n.args[2]
    if n.target not in _COPIES or len(n.args) != 2 or not isinstance(n.args[0], fx.Node):
        return None
    chain, dst, reader = [], n.args[0], n
    while _view(dst, reader, n, order):
        chain.insert(0, (dst.args[0], dst.args[1]))
        dst, reader = dst.args[0], dst
    return dst, chain, n.args[1]


def _whole(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return all(p == slice(None) or p is Ellipsis for p in parts)


def _shape(n):
    return tuple(getattr(n.meta.get("tensor_meta"), "shape", ()) or ()) if isinstance(n, fx.Node) else None


def _functional_twin(n: fx.Node):
    """The functional ATen overload of an in-place ATen op ``n`` (``fill_.Tensor`` -> ``fill.Tensor``,
    ``masked_fill_.Scalar`` -> ``masked_fill.Scalar``), or None."""
    t = n.target
    if n.op != "call_function" or not isinstance(t, torch._ops.OpOverload) or t.namespace != "aten":
        return None
    name = t._schema.name.split("::")[-1]
    if not name.endswith("_") or name.endswith("__") or name == "copy_" or not n.args or not isinstance(n.args[0], fx.Node):
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    return getattr(packet, t._overloadname, None) if packet is not None else None


def _in_place_as_copies(gm: fx.GraphModule) -> int:
    """Write every in-place ATen op (``t[:, 0].fill_(v)``, ``t.masked_fill_(m, v)``, ...) as its functional twin
    followed by a ``copy_`` of the result into its input; readers of the op's result read the twin's."""
    count = 0
    for n in list(gm.graph.nodes):
        twin = _functional_twin(n)
        if twin is None:
            continue
        with gm.graph.inserting_before(n):
            value = gm.graph.call_function(twin, n.args, n.kwargs)
        value.meta.update({k: v for k, v in n.meta.items() if k in ("tensor_meta", "val")})
        n.replace_all_uses_with(value)
        n.target, n.args, n.kwargs = torch.ops.aten.copy_.default, (n.args[0], value), {}
        count += 1
    return count


def functional_copies(gm: fx.GraphModule) -> int:
    """Make the in-place writes of a shape-propagated graph functional (MViTv2's ``attn[:, :, s:, s:] = ...``,
    captured as ``copy_``): the readers of the tensor after the write read a new node, the written value itself (a
    whole, same-shaped write) or :func:`~edgequant.graph.ops.put_values` of it into each selection. Without it the
    export, which writes each node as a function of its inputs, fed the tensor as it was before the write to the ops
    after it. Other in-place ATen ops become a ``copy_`` of their functional twin's result first (BART's
    ``shift_tokens_right`` fills column 0 of the decoder's ids with ``fill_`` on a selection). Needs propagated shapes
    (and again after); returns how many writes."""
    count = _in_place_as_copies(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in list(gm.graph.nodes):
        found = _write(n, order)
        if found is None or not isinstance(found[2], fx.Node):
            continue
        base, chain, v = found
        mb, mv = base.meta.get("tensor_meta"), v.meta.get("tensor_meta")
        if not (hasattr(mb, "dtype") and hasattr(mv, "dtype") and mb.dtype == mv.dtype):
            continue
        new, at, shape = v, n, _shape(v)
        for parent, index in reversed(chain):
            if _whole(index) and _shape(parent) == shape:
                continue
            with gm.graph.inserting_after(at):
                new = at = gm.graph.call_function(ops.put_values, (parent, index, new))
            if "tensor_meta" in parent.meta:
                new.meta["tensor_meta"] = parent.meta["tensor_meta"]
            shape = _shape(parent)
        if shape != _shape(base):
            continue  # a broadcasting copy_: left as it is
        for u in [u for u in base.users if order.get(u, -1) > order[n]]:
            u.replace_input_with(base, new)
        dst = n.args[0]
        gm.graph.erase_node(n)
        while dst is not base and isinstance(dst, fx.Node) and not dst.users:
            up = dst.args[0]
            gm.graph.erase_node(dst)
            dst = up
        count += 1
    if count:
        gm.recompile()
    return count
