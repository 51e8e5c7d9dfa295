"""The second capture path: ``torch.export``, raised back to layer level.

``torch.fx`` symbolic tracing stops at Python that inspects values: Hugging Face models build their
attention masks and position ids from tensor sizes, check config flags inside decorators and slice
buffers with traced sizes. ``torch.export`` runs that Python for real and records the tensor ops
(ATen) it performed, with sizes kept symbolic (batch and sequence length stay free). Its graph is one
level too low for quantization, though: a Linear is ``aten.linear(x, weight, bias)``, not a layer.

:func:`capture_exported` rebuilds a layer-level ``fx.GraphModule`` from it:

* ``aten.linear`` / ``conv*d`` / ``layer_norm`` / ``embedding`` whose weight is a layer's own parameter
  become ``call_module`` nodes of that layer (so registration, BN/CLE passes, the plan and the export see
  the same layers as in an fx capture);
* the common tensor ops become the torch functions and methods :mod:`edgequant.graph.ops` knows
  (``aten.add.Tensor`` -> ``operator.add``, ``aten.softmax.int`` -> ``torch.softmax``,
  ``aten.sym_size.int`` -> ``x.size(d)``, ...); other ATen ops stay as they are (left in float);
* dropout in eval mode and export's runtime assertions are dropped;
* an addition of a *mask* (a float tensor computed from integer inputs only, such as a transformer's
  additive attention mask of 0 and -3.4e38) becomes :func:`~edgequant.graph.ops.add_mask`: it keeps its
  input's grid instead of getting an output quantizer that the mask's huge negative values would ruin.

Inputs and outputs keep the model's structure (export's pytree in/out specs), so the captured module is
called exactly like the model. Example batches of one are doubled for the trace, so the batch size
stays free.
"""
from __future__ import annotations

import inspect
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn.modules import own_forward
from .ops import add_mask

aten = torch.ops.aten
#: the name prefix of the constants the capture computed once (buffers of the captured module, not of the model)
FOLDED = "_folded_"

# aten overload -> (kind, target): "function" keeps positional args, "method" calls a tensor method
_FUNCTIONS: dict[Any, tuple[str, Callable | str]] = {
    aten.add.Tensor: ("function", operator.add),
    aten.sub.Tensor: ("function", operator.sub),
    aten.mul.Tensor: ("function", operator.mul),
    aten.div.Tensor: ("function", operator.truediv),
    aten.matmul.default: ("function", torch.matmul),
    aten.bmm.default: ("function", torch.bmm),
    aten.softmax.int: ("function", torch.softmax),
    aten.tanh.default: ("function", torch.tanh),
    aten.relu.default: ("function", torch.relu),
    aten.sigmoid.default: ("function", torch.sigmoid),
    aten.cat.default: ("function", torch.cat),
    aten.mean.dim: ("function", torch.mean),
    aten.sum.dim_IntList: ("function", torch.sum),
    aten.exp.default: ("function", torch.exp),
    aten.sqrt.default: ("function", torch.sqrt),
    aten.rsqrt.default: ("function", torch.rsqrt),
    aten.gelu.default: ("function", F.gelu),
    aten.silu.default: ("function", F.silu),
    aten.hardswish.default: ("function", F.hardswish),
    aten.squeeze.dim: ("function", torch.squeeze),
    aten.transpose.int: ("function", torch.transpose),
    aten.permute.default: ("function", torch.permute),
    aten.reshape.default: ("function", torch.reshape),
    aten.unsqueeze.default: ("function", torch.unsqueeze),
    aten.flatten.using_ints: ("function", torch.flatten),
    aten.view.default: ("method", "view"),
    aten.contiguous.default: ("method", "contiguous"),
    aten.expand.default: ("method", "expand"),
    aten.expand_as.default: ("method", "expand_as"),
    aten.sym_size.int: ("method", "size"),
    aten.clone.default: ("method", "clone"),
    aten.adaptive_avg_pool2d.default: ("function", F.adaptive_avg_pool2d),
    aten.avg_pool2d.default: ("function", F.avg_pool2d),
    aten.max_pool2d.default: ("function", F.max_pool2d),
    aten.chunk.default: ("function", torch.chunk),
    aten.roll.default: ("function", torch.roll),
    aten.split.Tensor: ("function", torch.split),
    aten.split_with_sizes.default: ("function", torch.split),
    aten.unbind.int: ("function", torch.unbind),
    aten.scaled_dot_product_attention.default: ("function", F.scaled_dot_product_attention),
    aten.linalg_vector_norm.default: ("function", torch.linalg.vector_norm),  # F.normalize: x / clamp_min(norm, eps)
    aten.clamp_min.default: ("function", torch.clamp_min),
    aten.clamp.default: ("function", torch.clamp),
}
# in-place activations (timm's ``act(inplace=True)``) -> their functional form, where nothing else reads the input
_IN_PLACE = {
    aten.relu_.default: torch.relu,
    aten.hardswish_.default: F.hardswish,
    aten.hardsigmoid_.default: F.hardsigmoid,
    aten.silu_.default: F.silu,
    aten.sigmoid_.default: torch.sigmoid,
    aten.tanh_.default: torch.tanh,
    aten.add_.Tensor: operator.add,
}
# aten op -> (layer types it stands for, index of the data argument, indices of (weight, bias) arguments)
_LAYERS = {
    aten.linear.default: ((nn.Linear,), 0, (1, 2)),
    aten.conv1d.default: ((nn.Conv1d,), 0, (1, 2)),
    aten.conv2d.default: ((nn.Conv2d,), 0, (1, 2)),
    aten.layer_norm.default: ((nn.LayerNorm,), 0, (2, 3)),
    aten.embedding.default: ((nn.Embedding,), 1, (0, None)),
    aten.batch_norm.default: ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), 0, (1, 2)),  # eval mode only
}


def _same_dtype(n: fx.Node) -> bool:
    """Whether ``n`` is ``aten.to(dtype)`` to the dtype its input already has."""
    if n.target is not aten.to.dtype or not isinstance(n.args[0], fx.Node) or n.kwargs.get("memory_format") is not None:
        return False
    src, dst = n.args[0].meta.get("val"), n.meta.get("val")
    return isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.dtype == dst.dtype


def _batch_doubled(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Tensors with a batch of one repeated to two (export specializes sizes of 1)."""
    def grow(x):
        return torch.cat([x, x]) if torch.is_tensor(x) and x.ndim >= 1 and x.shape[0] == 1 else x
    return tuple(grow(a) for a in args), {k: grow(v) for k, v in kwargs.items()}


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict, dims=None) -> dict:
    """The dimensions ``dims`` of every tensor input free (``Dim.AUTO``), keyed by ``forward``'s argument names;
    by default every dimension of token-like inputs (integer or at most 2-D: batch and sequence length) and the
    batch of image-like ones (float, 3-D or more: their spatial sizes symbolic sent export's solver into minutes
    of work on timm's MobileViT-v2)."""
    auto = torch.export.Dim.AUTO

    def free(x, d):
        if dims is not None:
            return d in dims
        return d == 0 or not (x.is_floating_point() and x.ndim >= 3)

    def spec(x):
        if torch.is_tensor(x):
            return {d: auto for d in range(x.ndim) if free(x, d)}
        if isinstance(x, (tuple, list)):
            return type(x)(spec(v) for v in x)
        if isinstance(x, dict):
            return {k: spec(v) for k, v in x.items()}
        return None
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {k: spec(v) for k, v in bound.arguments.items()}


def _inline_disabled_autocast(gm: fx.GraphModule) -> None:
    """Inline the ``torch.autocast(enabled=False)`` regions of an exported graph (a higher-order op calling a
    sub-graph: timm's EfficientViT keeps its attention in float32 that way): with autocast off they compute in the
    model's own dtype, like the rest of the graph. Regions that do cast, or whose sub-graph reads attributes, stay."""
    hop = getattr(torch.ops.higher_order, "wrap_with_autocast", None)
    for n in list(gm.graph.nodes):
        if hop is None or n.target is not hop or n.args[2] or not isinstance(n.args[4], fx.Node):
            continue
        sub = getattr(gm, str(n.args[4].target), None)
        if not isinstance(sub, fx.GraphModule) or any(x.op == "get_attr" for x in sub.graph.nodes):
            continue
        phs = [x for x in sub.graph.nodes if x.op == "placeholder"]
        with gm.graph.inserting_before(n):
            out = gm.graph.graph_copy(sub.graph, dict(zip(phs, n.args[5:])))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for u in list(n.users):
            if u.target is operator.getitem and isinstance(u.args[1], int):
                u.replace_all_uses_with(outs[u.args[1]])
                gm.graph.erase_node(u)
        if n.users:
            n.replace_all_uses_with(out)
        holder = n.args[4]
        gm.graph.erase_node(n)
        if not holder.users:
            gm.graph.erase_node(holder)
    gm.recompile()


def export_program(model: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` on the example inputs, every tensor dimension left free where the
    model allows it."""
    args, kwargs = _batch_doubled(tuple(args), dict(kwargs))
    # shape code export cannot keep symbolic (a guard on H % 32): then only the batch free, then fixed sizes
    specs = (_dynamic_shapes(model, args, kwargs), _dynamic_shapes(model, args, kwargs, dims={0}), None)
    with torch.no_grad():
        for i, spec in enumerate(specs):
            try:
                return torch.export.export(model, args, kwargs, dynamic_shapes=spec, strict=False)
            except Exception:  # noqa: BLE001 -- the last attempt's error is the one raised
                if i == len(specs) - 1:
                    raise


def _owner(node, layers: dict[str, nn.Module]) -> tuple[str, nn.Module] | None:
    """The layer whose parameter a ``get_attr`` node reads, with its name."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    path, _, attr = str(node.target).rpartition(".")
    m = layers.get(path)
    return (path, m) if m is not None and getattr(m, attr, None) is not None else None


def _as_layer(n: fx.Node, layers: dict[str, nn.Module], rebuilt: frozenset = frozenset()):
    """``(layer name, data argument)`` when aten node ``n`` is exactly the computation of one of the
    model's layers (its own weight and bias, default options; ``rebuilt``: linear nodes whose bias the forward rebuilt
    from the layer's own, :func:`_rebuilt_biases`), else None."""
    entry = _LAYERS.get(n.target)
    if entry is None:
        return None
    types, data, (wi, bi) = entry
    owner = _owner(n.args[wi] if len(n.args) > wi else None, layers)
    if owner is None or not isinstance(owner[1], types) or own_forward(owner[1]):  # own forward: its own ops
        return None
    name, m = owner
    bias = n.args[bi] if bi is not None and len(n.args) > bi else None
    want_bias = getattr(m, "bias", None) if bi is not None else None
    if (bias is None) != (want_bias is None) or (bias is not None and _owner(bias, layers) != owner and n not in rebuilt):
        return None
    if isinstance(m, nn.LayerNorm) and (list(n.args[1]) != list(m.normalized_shape) or (len(n.args) > 4 and n.args[4] != m.eps)):
        return None
    if isinstance(m, (nn.Conv1d, nn.Conv2d)) and not _conv_matches(n, m):
        return None
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
            len(n.args) < 8 or n.args[5] or _owner(n.args[3], layers) != owner or n.args[7] != m.eps):
        return None  # batch statistics (training) or buffers not the layer's own: the aten op stays
    return name, n.args[data]


def _conv_matches(n: fx.Node, m: nn.Module) -> bool:
    if isinstance(m.padding, str):  # "same"/"valid" export as aten.conv2d.padding, not matched here
        return False
    k = len(m.kernel_size)
    want = [list(m.stride), list(m.padding), list(m.dilation), m.groups]
    got = list(n.args[3:7]) + [None] * (4 - len(n.args[3:7]))
    defaults = [[1] * k, [0] * k, [1] * k, 1]
    got = [defaults[i] if g is None else (list(g) if isinstance(g, (list, tuple)) else g) for i, g in enumerate(got)]
    return got == want and m.padding_mode == "zeros"


def _static_float(n: fx.Node, static: dict[fx.Node, bool]) -> bool:
    val = n.meta.get("val")
    return static.get(n, False) and isinstance(val, torch.Tensor) and val.dtype.is_floating_point


def _mark_static(src: fx.Graph) -> dict[fx.Node, bool]:
    """Nodes computed from non-float model inputs and constants only (masks, position ids)."""
    static: dict[fx.Node, bool] = {}
    for n in src.nodes:
        if n.op == "placeholder":
            val = n.meta.get("val")
            static[n] = not (isinstance(val, torch.Tensor) and val.dtype.is_floating_point)
        elif n.op == "get_attr":
            static[n] = False  # weights: a float parameter makes whatever uses it data
        else:
            static[n] = all(static.get(a, True) for a in n.all_input_nodes)
    return static


def _lower_node(g: fx.Graph, n: fx.Node, load, layers, static, rebuilt: frozenset = frozenset()) -> fx.Node | None:
    layer = _as_layer(n, layers, rebuilt)
    if layer is not None:
        return g.call_module(layer[0], (load(layer[1]),))
    args, kwargs = load(n.args), load(n.kwargs)
    if n.target is aten.add.Tensor and not kwargs and len(n.args) == 2:
        a, b = n.args
        if isinstance(b, fx.Node) and _static_float(b, static) and not _static_float(a, static):
            return g.call_function(add_mask, (args[0], args[1]))
        if isinstance(a, fx.Node) and _static_float(a, static) and not _static_float(b, static):
            return g.call_function(add_mask, (args[1], args[0]))
    moved = _selection_or_pad(g, n, args)
    if moved is not None:
        return moved
    if n.target in _IN_PLACE and not n.kwargs and isinstance(n.args[0], fx.Node) and len(n.args[0].users) == 1:
        return g.call_function(_IN_PLACE[n.target], args)
    if n.target in _FUNCTIONS and not (n.target is aten.add.Tensor and kwargs):
        how, target = _FUNCTIONS[n.target]
        return g.call_method(target, args, kwargs) if how == "method" else g.call_function(target, args, kwargs)
    return g.call_function(n.target, args, kwargs)


def _selection_or_pad(g: fx.Graph, n: fx.Node, args: tuple) -> fx.Node | None:
    """``aten.slice`` / ``aten.select`` as ``x[:, a:b]`` / ``x[:, i]``, and a zero ``aten.pad`` / ``constant_pad_nd``
    as ``F.pad``: ops that move values without computing (the integers pass on, no quantizer of their own), or None
    for other nodes.
    A pad with another constant (LiteMLA pads with 1.0) keeps it: the value need not lie on the input's grid, so its
    output gets a quantizer of its own (:mod:`edgequant.graph.ops` reads the value)."""
    if n.target is aten.index.Tensor and len(n.args) == 2 and all(isinstance(i, fx.Node) for i in n.args[1]):
        return g.call_function(operator.getitem, (args[0], tuple(args[1])))  # a table indexed by tensors (a gather)
    val = n.args[0].meta.get("val") if n.args and isinstance(n.args[0], fx.Node) else None
    if n.target is aten.select.int and isinstance(val, torch.Tensor) and all(isinstance(v, int) for v in n.args[1:3]):
        return g.call_function(operator.getitem, (args[0], (slice(None),) * (n.args[1] % val.ndim) + (n.args[2],)))
    if n.target is aten.slice.Tensor:
        dim, start, end, step = (list(n.args[1:]) + [0, None, None, 1][len(n.args) - 1:])[:4]
        if not (isinstance(val, torch.Tensor) and all(v is None or isinstance(v, int) for v in (dim, start, end, step))):
            return None
        end = None if end is not None and end >= 2 ** 62 else end  # export's "to the end" is INT64_MAX
        index = (slice(None),) * (dim % val.ndim) + (slice(start or None, end, None if step == 1 else step),)
        return g.call_function(operator.getitem, (args[0], index))
    pads = {aten.pad.default: (1, 2, 3), aten.constant_pad_nd.default: (1, None, 2)}.get(n.target)
    if pads is None:
        return None
    pad, mode_at, value_at = pads
    mode = n.args[mode_at] if mode_at is not None and len(n.args) > mode_at else "constant"
    value = n.args[value_at] if len(n.args) > value_at else None
    if mode != "constant" or n.kwargs:
        return None
    if value not in (None, 0, 0.0):
        return g.call_function(F.pad, (args[0], args[pad], "constant", float(value)))
    return g.call_function(F.pad, (args[0], args[pad]))


#: ops whose output depends on their tensor input's dtype, device and shape, not its values
_FACTORIES = {aten.new_zeros.default, aten.new_ones.default, aten.new_full.default, aten.new_empty.default,
              aten.zeros_like.default, aten.ones_like.default, aten.full_like.default, aten.empty_like.default}


def _foldable(src: fx.Graph, params: set) -> set:
    """The nodes of an exported graph that compute the same tensor whatever the inputs' values: built from constants,
    buffers and static shapes only (Swin's shifted-window attention mask: ``new_zeros`` of the image's size, slices
    filled in place, ``masked_fill``). Parameters (``params``: their ``get_attr`` targets) count as inputs, so what
    training would change is never folded; a tensor whose shape follows the free batch size is not folded either."""
    fixed: set = set()

    def static(v) -> bool:
        return isinstance(v, torch.Tensor) and all(isinstance(d, int) for d in v.shape)

    for n in src.nodes:
        val = n.meta.get("val")
        if n.op == "get_attr":
            if str(n.target) not in params:
                fixed.add(n)
        elif n.op == "call_function" and n.target is aten.sym_size.int and isinstance(val, int):
            fixed.add(n)  # a static size of an input (the image's height)
        elif n.op == "call_function" and (static(val) or (n.target is operator.getitem
                                                           and not isinstance(val, torch.Tensor))):  # a tuple's part
            ins = n.all_input_nodes[1:] if n.target in _FACTORIES else n.all_input_nodes
            if all(a in fixed for a in ins):
                fixed.add(n)
    return fixed


class _Snapshots(fx.Interpreter):
    """Runs the exported module and keeps the value each folded node has when an unfolded node first reads it (an
    in-place fill after a read would otherwise show in the constant)."""

    def __init__(self, gm: fx.GraphModule, fixed: set):
        super().__init__(gm, garbage_collect_values=False)
        self.fixed, self.taken = fixed, {}

    def run_node(self, n):
        if n not in self.fixed:
            for a in n.all_input_nodes:
                if a in self.fixed and a not in self.taken and isinstance(self.env[a], torch.Tensor):
                    self.taken[a] = self.env[a].detach().clone()
        return super().run_node(n)


def _folded_constants(src: fx.GraphModule, model: nn.Module, args: tuple, kwargs: dict) -> tuple[dict, set]:
    """``({node: tensor}, dropped)``: the values, on the example inputs, of the foldable nodes of ``src`` that
    unfoldable nodes read (:func:`_foldable`), which the lowered graph reads as constants, and the other foldable
    computations, which it leaves out."""
    params = {name for name, _ in model.named_parameters()}
    fixed = {n for n in _foldable(src.graph, params) if n.op == "call_function" and n.target is not aten.sym_size.int}
    if not fixed:
        return {}, set()
    runner = _Snapshots(src, fixed)
    flat = torch.utils._pytree.tree_leaves((args, kwargs))
    with torch.no_grad():
        runner.run(*flat)
    dropped = fixed - set(runner.taken)
    for n in reversed(src.graph.nodes):  # what an emitted node reads, other than a constant, is emitted too
        if n not in runner.taken and n not in dropped:
            dropped -= set(n.all_input_nodes)
    return runner.taken, dropped


def _descendants(start: fx.Node, within: set) -> set:
    found, todo = set(), [start]
    while todo:
        for u in todo.pop().users:
            if u in within and u not in found:
                found.add(u)
                todo.append(u)
    return found


def _bias_values(src: fx.GraphModule, fixed: set, nodes: list, args: tuple, kwargs: dict) -> list:
    """The values ``nodes`` (computed from parameters only) have when the layer call first reads them, in one run."""
    runner = _Snapshots(src, fixed)
    with torch.no_grad():
        runner.run(*torch.utils._pytree.tree_leaves((args, kwargs)))
    return [runner.taken[b] for b in nodes]


def _rebuilt_biases(src: fx.GraphModule, args: tuple, kwargs: dict, layers: dict) -> tuple[frozenset, set]:
    """``(linear nodes, nodes to drop)``: the ``aten.linear`` calls that pass a linear layer's own weight with a bias the
    forward rebuilt from the layer's own bias alone (torchvision's Swin v2 clones ``qkv.bias`` and zeroes its key third
    in place, every call). Such a layer becomes a layer call when the rebuild is idempotent: its bias then takes the
    rebuilt value (the forward, rebuilding it again, computes the same), and the rebuild's nodes are dropped. Two runs of
    the module in all: the rebuilt values, then the rebuild of those."""
    fixed = _foldable(src.graph, set())  # parameters count as constants here
    params = {name for name, _ in src.named_parameters()}
    reads_attr = {str(a.target): a for a in src.graph.nodes if a.op == "get_attr"}
    found = []  # (linear node, owner, bias node, rebuild nodes)
    for n in src.graph.nodes:
        owner = _owner(n.args[1], layers) if n.target is aten.linear.default and len(n.args) > 2 else None
        b = n.args[2] if owner is not None else None
        if (owner is None or not isinstance(owner[1], nn.Linear) or own_forward(owner[1]) or owner[1].bias is None
                or not isinstance(b, fx.Node) or b.op == "get_attr" or b not in fixed):
            continue
        root = reads_attr.get(f"{owner[0]}.bias")
        group = _descendants(root, fixed) if root is not None else set()
        reads = {a for m in group for a in m.all_input_nodes if a not in group}
        if b not in group or any(a.op == "get_attr" and a is not root and str(a.target) in params for a in reads) or any(
                u not in group and u is not n for m in group for u in m.users):
            continue
        found.append((n, owner, b, group))
    if not found:
        return frozenset(), set()
    steps = {m for _, _, _, group in found for m in group if m.op == "call_function"}
    values = _bias_values(src, steps, [b for _, _, b, _ in found], args, kwargs)
    biases = [{id(t): t for t in (owner[1].bias, operator.attrgetter(f"{owner[0]}.bias")(src))}.values()
              for _, owner, _, _ in found]
    before = [owner[1].bias.detach().clone() for _, owner, _, _ in found]
    with torch.no_grad():
        for tensors, value in zip(biases, values):
            for t in tensors:
                t.copy_(value)
    again = _bias_values(src, steps, [b for _, _, b, _ in found], args, kwargs)
    chosen, gone = set(), set()
    for (n, _, _, group), tensors, value, old, new in zip(found, biases, values, before, again):
        if torch.equal(new, value):
            chosen.add(n)
            gone |= group
        else:
            with torch.no_grad():
                for t in tensors:
                    t.copy_(old)
    return frozenset(chosen), gone


def _replace_devices(a, device: fx.Node):
    """``a`` with every ``torch.device`` constant (export records the trace's device in factory calls such as
    ``arange``) replaced by ``device``, so the graph runs wherever its inputs are."""
    if isinstance(a, torch.device):
        return device
    if isinstance(a, (tuple, list)):
        return type(a)(_replace_devices(v, device) for v in a)
    if isinstance(a, dict):
        return {k: _replace_devices(v, device) for k, v in a.items()}
    return a


def _attr(model: nn.Module, src: nn.Module, target: str):
    """The model's own tensor at ``target`` (a parameter such as ViT's class token stays the model's, so
    training and weight copies reach it), else export's lifted constant."""
    try:
        return operator.attrgetter(target)(model)
    except AttributeError:
        return operator.attrgetter(target)(src)


def capture_exported(model: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    """A layer-level ``GraphModule`` of ``model`` through ``torch.export`` (see the module docstring).
    Raises whatever ``torch.export`` raises when it cannot export the model."""
    args, kwargs = _batch_doubled(tuple(args), dict(kwargs))  # once: export_program's own doubling is then a no-op
    ep = export_program(model, args, kwargs)
    src = ep.module()
    _inline_disabled_autocast(src)
    layers = dict(model.named_modules())
    rebuilt, rebuild_steps = _rebuilt_biases(src, args, kwargs, layers)
    constants, dropped = _folded_constants(src, model, args, kwargs)
    dropped = (dropped | rebuild_steps) - set(constants)
    static = _mark_static(src.graph)
    g = fx.Graph()
    env: dict[fx.Node, Any] = {}

    device: list[fx.Node] = []  # the device of the first tensor input, read at run time

    def load(a):
        a = fx.node.map_arg(a, lambda x: env[x])
        return _replace_devices(a, device[0]) if device else a

    for n in src.graph.nodes:
        if n.op == "placeholder":
            env[n] = g.placeholder(n.target)
            if not device and isinstance(n.meta.get("val"), torch.Tensor):
                device.append(g.call_function(getattr, (env[n], "device")))
        elif n.op == "get_attr":
            env[n] = g.get_attr(str(n.target))
        elif n in constants:  # computed from constants and static sizes only: its value on the example
            env[n] = g.get_attr(f"{FOLDED}{n.name}")
        elif n.op == "output":
            g.output(load(n.args[0]))
        elif n.op == "call_module" or n.target is aten._assert_tensor_metadata.default or n in dropped:
            env[n] = None  # export's input guards; computations folded into constants
        elif n.target is aten.dropout.default and not (n.args[2] if len(n.args) > 2 else n.kwargs.get("train")):
            env[n] = load(n.args[0])
        elif _same_dtype(n) or n.target is aten.alias.default:  # x.to(x.dtype) on float32 (LiteMLA), an alias
            env[n] = load(n.args[0])
        else:
            env[n] = _lower_node(g, n, load, layers, static, rebuilt)
        if isinstance(env.get(n), fx.Node) and n.op not in ("placeholder", "output"):
            env[n].meta.update({k: v for k, v in n.meta.items() if k in ("nn_module_stack", "stack_trace")})
    g._codegen = src.graph._codegen
    for n in [n for n in g.nodes if n.op == "get_attr" and not n.users]:  # the weights now inside layers
        g.erase_node(n)
    folded = {f"{FOLDED}{n.name}": v for n, v in constants.items()}
    root: dict[str, Any] = {n.target: folded[n.target] if n.target in folded else _attr(model, src, n.target)
                            for n in g.nodes if n.op == "get_attr"}
    root.update({n.target: layers[n.target] for n in g.nodes if n.op == "call_module"})
    gm = fx.GraphModule(root, g, type(model).__name__)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    gm.train(model.training)
    return gm
