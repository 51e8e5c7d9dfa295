"""Attention made of parts a quantizer can sit between.

Two rewrites, both exact in float (up to the order of float32 operations):

* :func:`decompose_mha` (before capture) puts a :class:`~edgequant.nn.attention.DecomposedMultiheadAttention`
  in place of every ``nn.MultiheadAttention`` of the model (torchvision's ViT): its projections become
  ``nn.Linear`` layers with weight quantizers, instead of one opaque float call.
* :func:`decompose_sdpa` (on the captured graph) splits every ``F.scaled_dot_product_attention`` node (timm's
  and Hugging Face's attention, and the decomposed MHA's) into ``q @ k^T``,
  :func:`~edgequant.core.attention.attention_softmax` (scale, mask and softmax, in float) and ``probs @ v``.
  The planner then quantizes what an integer runtime computes: both products read 8-bit grids
  (``QLinearMatMul``), the scores and the probabilities get their own quantizers.

An attention node left whole (``enable_gqa``, dropout in training) stays one float op, as before.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..core.attention import attention_softmax
from ..nn.attention import DecomposedMultiheadAttention
from . import ops, patterns
from .ops import add_mask
from .patterns import computes_the_same, layer_calls, set_submodule

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


def _rewrote(gm: fx.GraphModule, count: int) -> int:
    """``count``, after regenerating ``gm``'s code when a pass changed its graph."""
    if count:
        gm.recompile()
    return count


def decompose_mha(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, str]:
    """Replace ``model``'s ``nn.MultiheadAttention`` layers in place by decomposed ones; returns ``{layer: what it
    became}``. Layers the example inputs do not call with batched (3-D) inputs, and those with ``add_bias_kv`` /
    ``add_zero_attn``, stay as they are; so does one whose decomposed output differs on the recorded call."""
    done = {}
    for name, m, a, kw in layer_calls(model, lambda m: type(m) is nn.MultiheadAttention, args, kwargs):
        query = a[0] if a else kw.get("query")
        if not isinstance(query, torch.Tensor) or query.dim() != 3 or m.bias_k is not None or m.add_zero_attn:
            continue
        new = DecomposedMultiheadAttention.from_float(m)
        with torch.no_grad():
            ref, got = m(*a, **kw), new(*a, **kw)
        same = all(r is None and g is None or (r is not None and g is not None and computes_the_same(r, g))
                   for r, g in zip(ref, got))
        if same:
            set_submodule(model, name, new)
            done[name] = "MultiheadAttention -> DecomposedMultiheadAttention"
    return done


def prune_dead(gm: fx.GraphModule) -> int:
    """Remove the pure known ops whose result nothing reads (the attention weights a model's ``mha(x, x, x)[0]``
    discards): they would get quantizers and exported nodes of their own. Returns how many."""
    removed = 0
    for n in reversed(list(gm.graph.nodes)):
        if (not n.users and n.op in ("call_function", "call_method") and ops.node_op(n, {}) is not None
                and not str(getattr(n.target, "__name__", n.target)).endswith("_")):
            gm.graph.erase_node(n)
            removed += 1
    return _rewrote(gm, removed)


def select_unbound(gm: fx.GraphModule) -> int:
    """``q, k, v = qkv.unbind(0)`` (timm's attention) as three plain selections ``qkv[0]``, ``qkv[1]``, ``qkv[2]``:
    the same values, but a selection moves stored integers in the export (the integer-exact mode follows it), so both
    products of attention read 8-bit grids. Only where every reader takes one item; returns how many unbinds."""
    count = 0
    for n in list(gm.graph.nodes):
        if not ((n.op == "call_function" and n.target is torch.unbind) or (n.op == "call_method" and n.target == "unbind")):
            continue
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
        if not isinstance(dim, int) or dim < 0 or not n.users or not all(
                u.op == "call_function" and u.target is operator.getitem and u.args[0] is n and isinstance(u.args[1], int)
                and not n.kwargs.keys() - {"dim"} for u in n.users):
            continue
        for u in list(n.users):
            with gm.graph.inserting_before(u):
                sel = gm.graph.call_function(operator.getitem, (n.args[0], (slice(None),) * dim + (u.args[1],)))
            sel.meta = dict(u.meta)
            u.replace_all_uses_with(sel)
            gm.graph.erase_node(u)
        gm.graph.erase_node(n)
        count += 1
    return _rewrote(gm, count)


_SOFTMAXES = (torch.softmax, F.softmax)


def _last_dim_softmax(n: fx.Node) -> bool:
    """A softmax over the last axis of a shape-propagated value, without a dtype cast."""
    if not ((n.op == "call_function" and n.target in _SOFTMAXES) or (n.op == "call_method" and n.target == "softmax")):
        return False
    dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
    meta = n.meta.get("tensor_meta")
    return n.kwargs.get("dtype") is None and meta is not None and isinstance(dim, int) and dim in (-1, len(meta.shape) - 1)


def _scaling(n) -> tuple:
    """``(x, factor)`` when node ``n`` is ``x * factor`` / ``factor * x`` / ``x / divisor`` with a Python number, read
    by one node only; ``(None, None)`` otherwise."""
    if not (isinstance(n, fx.Node) and len(n.users) == 1 and n.op == "call_function" and len(n.args) == 2):
        return None, None
    a, b = n.args
    if n.target in (operator.mul, torch.mul):
        if isinstance(a, fx.Node) and isinstance(b, (int, float)):
            return a, float(b)
        if isinstance(b, fx.Node) and isinstance(a, (int, float)):
            return b, float(a)
    if n.target in (operator.truediv, torch.div) and isinstance(a, fx.Node) and isinstance(b, (int, float)) and b:
        return a, 1.0 / b
    return None, None


def fuse_attention_softmax(gm: fx.GraphModule) -> int:
    """Attention written out (Hugging Face's eager BERT: ``softmax(q @ k^T * scale + mask)``; timm's unfused path:
    ``softmax((q * scale) @ k^T)``): the scaling and the mask go into one
    :func:`~edgequant.core.attention.attention_softmax` step, so the scores are rounded once, straight after their
    product (a separate ``* scale`` got a quantizer of its own: a second rounding). Needs propagated shapes (and
    again after); returns how many softmaxes."""
    count = 0
    for n in list(gm.graph.nodes):
        if not _last_dim_softmax(n):
            continue
        x, mask, scale, gone = n.args[0], None, None, []
        if isinstance(x, fx.Node) and x.op == "call_function" and x.target is add_mask and len(x.users) == 1:
            gone, mask, x = [x], x.args[1], x.args[0]
        src, factor = _scaling(x)
        if src is not None:
            gone, scale, x = gone + [x], factor, src
        elif patterns.is_matmul(x) and len(x.users) == 1 and _scaling(x.args[0])[0] is not None:
            scaled = x.args[0]
            src, scale = _scaling(scaled)
            x.replace_input_with(scaled, src)  # (q * c) @ k == c * (q @ k)
            gm.graph.erase_node(scaled)
        if scale is None and mask is None:
            continue
        with gm.graph.inserting_before(n):
            new = gm.graph.call_function(attention_softmax, (x, scale, mask))
        new.meta = {k: v for k, v in n.meta.items() if k in ("nn_module_stack", "stack_trace")}
        n.replace_all_uses_with(new)
        for old in [n] + gone:
            gm.graph.erase_node(old)
        count += 1
    return _rewrote(gm, count)


def _bound(n: fx.Node) -> dict:
    out = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    out.update(zip(_SDPA_ARGS, n.args))
    out.update(n.kwargs)
    return out


def decompose_sdpa(gm: fx.GraphModule) -> int:
    """Split the ``F.scaled_dot_product_attention`` nodes of a shape-propagated graph (see the module docstring);
    returns how many. Each new node takes the attention node's module scope (tensor names
    ``<scope>.matmul``, ``<scope>.attention_softmax``, ``<scope>.matmul_1``); shapes must be propagated again."""
    count = 0
    for n in list(gm.graph.nodes):
        if not (n.op == "call_function" and n.target is F.scaled_dot_product_attention):
            continue
        a = _bound(n)
        meta = a["query"].meta.get("tensor_meta") if isinstance(a["query"], fx.Node) else None
        if a["enable_gqa"] or a["dropout_p"] != 0 or meta is None or not isinstance(a["is_causal"], bool):
            continue
        scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(meta.shape[-1])
        g = gm.graph
        with g.inserting_before(n):
            kt = g.call_function(torch.transpose, (a["key"], -2, -1))
            scores = g.call_function(torch.matmul, (a["query"], kt))
            probs = g.call_function(attention_softmax, (scores, scale, a["attn_mask"], a["is_causal"]))
            out = g.call_function(torch.matmul, (probs, a["value"]))
        for new in (kt, scores, probs, out):
            new.meta = {k: v for k, v in n.meta.items() if k in ("nn_module_stack", "stack_trace")}
        n.replace_all_uses_with(out)
        g.erase_node(n)
        count += 1
    return _rewrote(gm, count)
