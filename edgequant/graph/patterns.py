"""Graph patterns: the one home of what the passes look for in a captured graph.

Op properties come from :mod:`edgequant.graph.ops`; this module finds structures made of them:
producer/consumer walks (``only_user``, ``sole_user``, ``split_producer``), supergroups (what a fused
kernel computes: ``conv -> [bn] -> act``, ``add -> act``), the BatchNorm chain that folding looks for,
the layer pairs that cross-layer equalization scales, and the add / concat / global-pool predicates
of the integer lowering.
"""
from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn.modules import own_forward
from . import ops
from .capture import capture

#: pooling layers and functions that act on each channel separately
POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
POOL_FUNCTIONS = {F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, F.adaptive_avg_pool1d, F.avg_pool1d}
#: layers whose weights cross-layer equalization scales (not transposed convs)
EQUALIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# ---------------------------------------------------------------------- basics
def trace(model: nn.Module, args: Optional[tuple] = None, kwargs: Optional[dict] = None) -> tuple[fx.GraphModule, dict[str, nn.Module]]:
    """The model's fx graph (sharing its modules) and ``{qualified name: module}``; with example inputs, a model
    torch.fx cannot trace is captured through torch.export (see :func:`~edgequant.graph.capture.capture`)."""
    gm = capture(model, args, kwargs)
    return gm, dict(gm.named_modules())


def module_of(node, modules: dict) -> Optional[nn.Module]:
    """The module an fx ``call_module`` node calls, else None."""
    return modules.get(node.target) if isinstance(node, fx.Node) and node.op == "call_module" else None


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted) of ``root`` by ``new``."""
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def first_calls(model: nn.Module, layers: dict, args: tuple, kwargs: dict) -> Optional[dict]:
    """``{name: (args, kwargs)}`` of the first call of each of ``layers`` (``{name: module}`` inside ``model``) when
    ``model`` runs on the example inputs (without gradients); None when that run fails."""
    calls: dict = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, kw, name=name: calls.setdefault(name, (a, kw)) and None,
                                         with_kwargs=True) for name, m in layers.items()]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception:  # noqa: BLE001 -- the caller's own check of the example inputs reports it
        return None
    finally:
        for h in hooks:
            h.remove()
    return calls


def layer_calls(model: nn.Module, select, args: tuple, kwargs: dict) -> list:
    """``[(name, layer, args, kwargs), ...]``: each layer of ``model`` that ``select(layer)`` picks, with the arguments of
    its first call when ``model`` runs on the example inputs (``()``, ``{}`` when it is not called); empty when none is
    picked or the run fails."""
    todo = {name: m for name, m in model.named_modules() if select(m)}
    calls = first_calls(model, todo, args, kwargs) if todo else None
    if calls is None:
        return []
    return [(name, m) + tuple(calls.get(name, ((), {}))) for name, m in todo.items()]


def computes_the_same(ref: torch.Tensor, got: torch.Tensor) -> bool:
    """Whether a rewritten layer's output ``got`` is its original's ``ref`` up to float32 rounding (same shape; relative
    1e-4, absolute 1e-5 of the largest magnitude)."""
    return ref.shape == got.shape and torch.allclose(ref, got, rtol=1e-4, atol=1e-5 * float(ref.abs().max().clamp_min(1)))


def call_counts(gm: fx.GraphModule) -> dict[str, int]:
    """How many times each submodule is called in the graph."""
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
    return counts


def split_shared_activations(gm: fx.GraphModule) -> list[str]:
    """Give every call of a shared parameter-free activation module (one ``nn.ReLU6`` instance called in
    every block) its own copy, so that passes which change an activation per call site (a per-channel
    clamp after equalization) can; returns the names of the copies. ``gm`` is recompiled when any."""
    counts, seen, made = call_counts(gm), {}, []
    modules = dict(gm.named_modules())
    for n in gm.graph.nodes:
        m = module_of(n, modules)
        op = ops.node_op(n, modules) if m is not None else None
        if m is None or op is None or not op.fusable or counts[n.target] < 2 or any(True for _ in m.parameters()):
            continue
        seen[n.target] = seen.get(n.target, 0) + 1
        if seen[n.target] == 1:
            continue  # the first call keeps the module
        name = f"{n.target}_call{seen[n.target]}"
        gm.add_submodule(name, copy.deepcopy(m))
        n.target = name
        made.append(name)
    if made:
        gm.recompile()
    return made


def recorded_meta(n: fx.Node):
    """The ``tensor_meta`` shape propagation recorded for ``n``; for a module inserted after it (a
    quantizer, or the Identity of a disabled one) that of the value it passes on. None if there is none."""
    meta = n.meta.get("tensor_meta")
    while meta is None and n.op == "call_module" and n.args and isinstance(n.args[0], fx.Node):
        n = n.args[0]
        meta = n.meta.get("tensor_meta")
    return meta


def only_user(node: fx.Node) -> Optional[fx.Node]:
    """The single node that consumes ``node`` as its first argument, or None."""
    if len(node.users) != 1:
        return None
    u = next(iter(node.users))
    return u if u.args and u.args[0] is node else None


def sole_user(node: fx.Node, modules: dict) -> Optional[fx.Node]:
    """:func:`only_user`, looking through identity modules (such as the ``nn.Identity`` a folded
    BatchNorm leaves behind)."""
    while True:
        u = only_user(node)
        if u is None or not (u.op == "call_module" and ops.is_identity(u, modules)):
            return u
        node = u


def is_add(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and ops.node_op(node, {}) is ops.ADD


def is_mul(node: fx.Node) -> bool:
    """An elementwise product of two graph values (``a * b``, ``torch.mul(a, b)``, ``a.mul(b)``)."""
    mul = node.op == "call_function" and node.target in (operator.mul, torch.mul) or \
        node.op == "call_method" and node.target == "mul"
    return mul and len(node.args) >= 2 and all(isinstance(a, fx.Node) for a in node.args[:2])


def is_matmul(node: fx.Node) -> bool:
    """A matrix product of two graph values (``a @ b``, ``torch.matmul(a, b)``, ``a.matmul(b)``, ``torch.bmm``)."""
    mm = node.op == "call_function" and node.target in (operator.matmul, torch.matmul, torch.bmm) or \
        node.op == "call_method" and node.target in ("matmul", "bmm")
    return mm and len(node.args) >= 2 and all(isinstance(a, fx.Node) for a in node.args[:2])


def is_cat(node: fx.Node) -> bool:
    op = ops.node_op(node, {}) if node.op == "call_function" else None
    return op is not None and op.lowering == "cat"


def is_bn(node: fx.Node, modules: dict) -> bool:
    return isinstance(module_of(node, modules), ops.BN_MODULES)


def is_pool(node: fx.Node, modules: dict, functions: bool = True) -> bool:
    """A pooling op that acts on each channel separately (modules; functions too unless told not)."""
    return isinstance(module_of(node, modules), POOL_MODULES) or \
        (functions and node.op == "call_function" and node.target in POOL_FUNCTIONS)


def is_linear_like(node: fx.Node, modules: dict) -> bool:
    """A weighted layer that computes a sum of products (not an embedding lookup)."""
    m = module_of(node, modules)
    return m is not None and ops.module_op(m) is ops.WEIGHTED and not isinstance(m, (nn.Embedding, nn.EmbeddingBag))


_PRODUCTS = (operator.matmul, torch.matmul, torch.bmm, torch.mm, torch.einsum, "matmul", "bmm", "mm",
             F.linear, F.conv1d, F.conv2d, F.conv3d)


def read_by_product(node: fx.Node, modules: dict) -> bool:
    """Whether a product reads ``node``'s output -- a conv or linear layer, a matmul -- directly or through ops that
    move its values unchanged (reshape, permute, a selection, a split into q, k and v, ...)."""
    stack, seen = list(node.users), set()
    while stack:
        u = stack.pop()
        if u in seen:
            continue
        seen.add(u)
        if is_linear_like(u, modules) or (u.op in ("call_function", "call_method") and u.target in _PRODUCTS):
            return True
        moves = ops.keeps_grid(u, modules) or u.target in ops.PARTS
        if moves or (u.target is operator.getitem and ops.kind(u, modules) == "pass"):
            stack.extend(u.users)
    return False


# ---------------------------------------------------------------------- activations
def activation_bounds(node: fx.Node, modules: dict):
    """``(a, b)`` of a fusable activation ``clamp(x, a, b)`` (floats, or float64 per-channel tensors for a
    :class:`~edgequant.nn.ChannelClamp`; ``b`` may be ``inf``), or None for any other node."""
    if not ops.is_fusable_act(node, modules):
        return None
    m = module_of(node, modules)
    if m is not None and hasattr(m, "lo"):  # ChannelClamp
        return m.lo.double(), m.hi.double()
    if isinstance(m, nn.Hardtanh):  # ReLU6 is a Hardtanh
        return float(m.min_val), float(m.max_val)
    if node.op == "call_function" and node.target is F.relu6:
        return 0.0, 6.0
    return 0.0, math.inf


def following_activation(gm: fx.GraphModule, layer: str, modules: dict):
    """The fusable activation applied to the output of module ``layer`` (its direct, only consumer) as
    a callable, or None."""
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target == layer:
            if len(n.users) != 1:
                return None
            u = next(iter(n.users))
            if not ops.is_fusable_act(u, modules):
                return None
            if u.op == "call_module":
                return modules[u.target]
            return u.target if u.op == "call_function" else getattr(torch, u.target)
    return None


def split_producer(src: fx.Node, modules: dict) -> tuple[fx.Node, Optional[fx.Node]]:
    """Split ``act(base(...))`` (looking through identity ops) into (base node, activation node or None)."""
    act = None
    while True:
        if act is None and ops.is_fusable_act(src, modules):
            act, src = src, src.args[0]
        elif ops.is_identity(src, modules):
            src = src.args[0]
        else:
            return src, act


_DIVISIONS = (operator.truediv, torch.div, torch.true_divide, "div", "true_divide")
_POLES = (torch.rsqrt, torch.reciprocal, torch.log, "rsqrt", "reciprocal", "log")  # infinite at zero


_TO_POLE = (torch.sqrt, "sqrt", torch.clamp_min, "clamp_min", torch.clamp, "clamp", "expand", "expand_as")


def feeds_pole(node: fx.Node) -> bool:
    """Whether every reader of ``node`` is infinite where ``node`` is zero: the divisor of a division, ``rsqrt``,
    ``reciprocal``, ``log``, directly or through ``sqrt`` or a lower clamp (``F.normalize`` divides by
    ``clamp_min(norm, eps)``). A model protects such a value with ``+ eps``; an output grid coarser than ``eps``
    rounds it back to zero and ``x / (y + eps)`` becomes inf or NaN (timm's LiteMLA divides by ``sum + 1e-5``)."""
    users = list(node.users)
    for u in users:
        if u.op not in ("call_function", "call_method"):
            return False
        if u.target in _DIVISIONS and len(u.args) > 1 and u.args[1] is node and u.args[0] is not node:
            continue
        if u.target in _POLES or (u.target in _TO_POLE and feeds_pole(u)):
            continue
        return False
    return bool(users)


def in_supergroup(node: fx.Node, modules: dict) -> bool:
    """Whether ``node``'s output is fused into the next op's (``conv/linear -> bn``, ``conv/linear/bn/add
    -> ReLU-like``): a fused kernel computes them as one, so only the last gets an output quantizer."""
    u = sole_user(node, modules)
    if u is None:
        return False
    if is_linear_like(node, modules):
        return is_bn(u, modules) or ops.is_fusable_act(u, modules)
    return (is_bn(node, modules) or is_add(node)) and ops.is_fusable_act(u, modules)


# ---------------------------------------------------------------------- lowering
def is_global_pool(node: fx.Node, modules: dict) -> bool:
    """An average over all spatial positions (adaptive pool to 1, or a mean)."""
    m = module_of(node, modules)
    if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        osz = m.output_size if isinstance(m.output_size, (tuple, list)) else (m.output_size,)
        return all(o == 1 for o in osz)
    if node.op == "call_function" and node.target in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d):
        osz = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return all(o == 1 for o in (osz if isinstance(osz, (tuple, list)) else (osz,)))
    return (node.op == "call_method" and node.target == "mean") or (node.op == "call_function" and node.target is torch.mean)


def pool_dims(node: fx.Node, modules: dict, ndim: int) -> tuple[list[int], bool]:
    """Reduced dimensions of a global average pool node and whether they are kept."""
    if module_of(node, modules) is not None or node.target in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d):
        return list(range(2, ndim)), True
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if dims is None:  # x.mean(): every dimension
        return list(range(ndim)), False
    dims = [dims] if isinstance(dims, int) else list(dims)
    return dims, node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)


# ---------------------------------------------------------------------- BatchNorm chains
def bn_producer(bn_node: fx.Node, modules: dict) -> tuple[Optional[fx.Node], bool]:
    """The node a BatchNorm reads (looking back through identity ops that have one consumer), and
    whether every hop from it to the BatchNorm has a single consumer (so the two can be folded)."""
    src = bn_node.args[0] if bn_node.args else None
    while src is not None and ops.is_identity(src, modules) and len(src.users) == 1:
        src = src.args[0] if src.args else None
    if not isinstance(src, fx.Node):
        return src, False
    n = src
    while n is not bn_node:
        n = only_user(n)
        if n is None:
            return src, False
    return src, True


# ---------------------------------------------------------------------- equalization pairs
@dataclass
class Pair:
    """Two layers joined through ``act`` (a module name, a function name, or None)."""
    first: str
    second: str
    act: Optional[str]
    act_kind: str  # "none", "relu", "homogeneous" (leaky/prelu), "clamp" (ReLU6/Hardtanh/ChannelClamp)


def act_kind(node: fx.Node, modules: dict) -> Optional[str]:
    """How an activation commutes with per-channel scaling: ``relu`` and ``homogeneous`` exactly,
    ``clamp`` (a module: ReLU6, Hardtanh, ChannelClamp) once its bounds are scaled; None otherwise."""
    op = ops.node_op(node, modules)
    if op is None:
        return None
    if op.fusable and op.homogeneous:
        return "relu"
    if op.fusable and node.op == "call_module":
        return "clamp"
    return "homogeneous" if op.homogeneous else None


def _walk_to_second(node: fx.Node, modules: dict, counts: dict) -> tuple[Optional[fx.Node], Optional[fx.Node], str]:
    """From layer 1 through identity ops, pools and at most one activation to the next node."""
    n, act, kind = only_user(node), None, "none"
    while n is not None:
        if ops.is_identity(n, modules) or is_pool(n, modules, functions=False):
            n = only_user(n)
            continue
        k = act_kind(n, modules)
        if k is not None and act is None:
            if k == "clamp" and counts.get(n.target, 0) != 1:
                break  # a shared ReLU6 module cannot become a per-channel clamp
            act, kind = n, k
            n = only_user(n)
            continue
        break
    return n, act, kind


def equalization_pairs(gm: fx.GraphModule, modules: dict) -> list[Pair]:
    """Layer pairs ``L1 -> [identity ops] -> [one activation] -> [identity ops, pools] -> L2`` that
    can be equalized: every hop has a single consumer, layers and clamps are called once, and ``L2``
    reads all of ``L1``'s channels."""
    counts = call_counts(gm)
    pairs = []
    for node in gm.graph.nodes:
        l1 = module_of(node, modules)
        if not isinstance(l1, EQUALIZABLE) or counts[node.target] != 1 or own_forward(l1):
            continue
        n, act, kind = _walk_to_second(node, modules, counts)
        l2 = module_of(n, modules) if n is not None else None
        if not isinstance(l2, EQUALIZABLE) or counts[n.target] != 1 or own_forward(l2):
            continue
        out1 = l1.weight.shape[0]
        in2 = l2.weight.shape[1] * getattr(l2, "groups", 1)
        if out1 != in2 or (isinstance(l1, nn.Linear) != isinstance(l2, nn.Linear)):
            continue
        act_name = None if act is None else (act.target if act.op == "call_module" else str(act.target))
        pairs.append(Pair(node.target, n.target, act_name, kind))
    return pairs


def constant_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes of ``gm`` that depend on parameters and buffers only, in graph order, restricted to those with a module
    call (a layer, a quantizer) among themselves and their inputs, and the constant nodes these read; empty when there
    is no such call. The export computes them once with the sim (:mod:`edgequant.export.constants`: Swin v2's position
    bias MLP on its coordinate table) and the integer-exact mode does not count their quantizers as float-computed."""
    const: set[fx.Node] = set()
    moduled: set[fx.Node] = set()  # constant nodes with a module call among them or their inputs
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            const.add(n)
        elif (n.op in ("call_module", "call_function", "call_method") and n.target is not torch._assert and n.all_input_nodes
              and all(a in const for a in n.all_input_nodes)):
            const.add(n)
            if n.op == "call_module" or any(a in moduled for a in n.all_input_nodes):
                moduled.add(n)
    if not moduled:
        return []
    keep = set(moduled)
    for n in reversed(list(gm.graph.nodes)):  # and the constant inputs they read
        if n in keep:
            keep.update(a for a in n.all_input_nodes if a in const)
    return [n for n in gm.graph.nodes if n in keep]
