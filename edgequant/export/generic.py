"""The generic export path: an op without a hand-written ONNX mapping is exported by torch's own exporter.

The op alone (a module, function or method of one fx node, with its constant arguments) is wrapped in a
one-node module and exported with ``torch.onnx.export`` (the TorchScript exporter, whose ATen-to-ONNX
symbolic library covers the common ops: GELU, LayerNorm, softmax, permute/transpose, split, pad,
interpolate, adaptive pooling to any size, embedding, ...); its nodes and initializers are spliced into
the QDQ graph with fresh names. The op then runs in float between the ``DequantizeLinear`` of its
quantized inputs and the ``QuantizeLinear`` of its output, as the sim simulates it.

Inputs are synthesized from the shapes and dtypes that shape propagation recorded (integer inputs are
zeros, so an embedding lookup stays in range); the batch axis is marked dynamic when the export is.
Shape arithmetic (``x.size(0)``, ``x.shape[1]``) never reaches this path: the exporter folds it into
the static shapes the graph recorded (see ``onnx_qdq``).
"""
from __future__ import annotations

import io
import operator
import re
import warnings
from typing import Optional

import onnx
import torch
from torch import fx, nn

from ..errors import ExportError
from ..graph.patterns import recorded_meta
from .dynamic import SizeDependent


class NeedsOpset(ExportError):
    """torch.onnx exports the op only from opset :attr:`opset` on (``F.fold``: Col2Im, 18)."""

    def __init__(self, message: str, opset: int):
        super().__init__(message)
        self.opset = opset


class _OneOp(nn.Module):
    """``forward(*tensors)`` calls the node's target with its constant arguments filled back in; the arguments in
    ``replayed`` (read from a tensor's shape) are read again from the tensors passed after the node's own."""

    def __init__(self, node: fx.Node, module: Optional[nn.Module], consts: dict, replayed: Optional[dict] = None):
        super().__init__()
        self.node, self.inner, self.consts, self.replayed = node, module, consts, replayed or {}
        self.own = len(tensor_nodes(node, consts))  # the node's own tensors come first, then the shape sources

    def forward(self, *tensors):
        it = iter(tensors)
        env = dict(zip(shape_sources(self.replayed), tensors[self.own:]))

        def fill(v):
            if not isinstance(v, fx.Node):
                return v
            if v in self.replayed:
                return _replay(v, env)
            return self.consts[v] if v in self.consts else next(it)
        args = fx.node.map_aggregate(self.node.args, fill)
        kwargs = fx.node.map_aggregate(self.node.kwargs, fill)
        n = self.node
        if n.op == "call_module":
            return self.inner(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        return n.target(*args, **kwargs)


def tensor_nodes(node: fx.Node, consts: dict) -> list[fx.Node]:
    """The node's arguments that are tensors at export (``consts``: nodes already folded to values)."""
    found: list[fx.Node] = []
    keep = lambda v: found.append(v) if isinstance(v, fx.Node) and v not in consts else None  # noqa: E731
    fx.node.map_aggregate(node.args, keep)
    fx.node.map_aggregate(node.kwargs, keep)
    return found


def _shape_root(v: fx.Node) -> Optional[fx.Node]:
    """The tensor node whose shape the shape-arithmetic node ``v`` reads (``y.shape``, ``y.shape[-2:]``, ``y.size()``,
    ``y.size(2)``), or None for anything else."""
    if v.target is getattr and v.args[1] == "shape":
        return v.args[0]
    if v.op == "call_method" and v.target == "size":
        return v.args[0]
    if v.target is operator.getitem and isinstance(v.args[0], fx.Node) and isinstance(v.args[1], (int, slice)):
        return _shape_root(v.args[0])
    return None


def _replay(v: fx.Node, env: dict):
    """The value of shape-arithmetic node ``v`` (see :func:`_shape_root`) with its tensor taken from ``env``."""
    if v in env:
        return env[v]
    if v.target is getattr:
        return _replay(v.args[0], env).shape
    if v.target == "size":
        return _replay(v.args[0], env).size(*v.args[1:])
    return _replay(v.args[0], env)[v.args[1]]


def shape_reads(node: fx.Node, consts: dict) -> dict[fx.Node, fx.Node]:
    """``{argument node: tensor node}`` for the arguments of ``node`` folded from a tensor's shape (the ``size`` of
    ``F.interpolate(x, size=y.shape[-2:])``), which an export with symbolic sizes reads from that tensor at run time."""
    found = {}

    def visit(v):
        if isinstance(v, fx.Node) and v in consts and (root := _shape_root(v)) is not None and root not in consts:
            found[v] = root
    fx.node.map_aggregate(node.args, visit)
    fx.node.map_aggregate(node.kwargs, visit)
    return found


def shape_sources(replayed: dict) -> list[fx.Node]:
    """The tensors whose shapes the ``replayed`` arguments (:func:`shape_reads`) read, once each, in order: the extra
    inputs of a generically exported op after its own."""
    return list(dict.fromkeys(replayed.values()))


def _example(n: fx.Node) -> torch.Tensor:
    meta = recorded_meta(n)
    if meta is None or not hasattr(meta, "shape"):
        raise ExportError(f"{n.name}: no recorded shape for an input of a generically exported op")
    if meta.dtype.is_floating_point:
        return torch.randn(tuple(meta.shape)).to(meta.dtype)
    return torch.zeros(tuple(meta.shape), dtype=meta.dtype)


def _dynamic_axes(named, dynamic_batch: bool, dynamic_size: bool) -> dict:
    """torch.onnx's ``dynamic_axes`` for ``named`` ``(name, example, is data)``: the batch axis, and with
    ``dynamic_size`` the dimensions after the channels of data tensors of 3 to 5 dimensions."""
    dyn = {}
    for name, x, data in named:
        axes = {0: "N"} if dynamic_batch and x.dim() > 0 else {}
        if dynamic_size and data and 3 <= x.dim() <= 5:
            axes.update({d: f"{name}_d{d}" for d in range(2, x.dim())})
        if axes:
            dyn[name] = axes
    return dyn


def export_one(b, node: fx.Node, module: Optional[nn.Module], inputs: list[str], out: str, dynamic_batch: bool,
               consts: dict, replayed: Optional[dict] = None, dynamic_size: bool = False) -> str:
    """Splice the ONNX of ``node`` (``inputs``: the ONNX names of its tensor arguments, in argument
    order, then of the tensors whose shapes the ``replayed`` arguments read (:func:`shape_reads`); ``consts``:
    argument nodes folded to Python values) into builder ``b``; its output gets the name ``out``. With
    ``dynamic_size`` the dimensions after the channels of inputs and outputs of 3 to 5 dimensions are symbolic.
    Raises ExportError naming the op when torch's exporter cannot export it either."""
    replayed = replayed or {}
    tnodes = tensor_nodes(node, consts) + shape_sources(replayed)
    if len(tnodes) != len(inputs):
        raise ExportError(f"{node.name}: {len(inputs)} ONNX inputs for {len(tnodes)} tensor arguments")
    examples = tuple(_example(t) for t in tnodes)
    in_names = [f"in{i}" for i in range(len(examples))]
    buf = io.BytesIO()
    op = _OneOp(node, module, consts, replayed).eval()
    with torch.no_grad():
        result = op(*examples)
    # chunk, split, unbind, MultiheadAttention: several outputs (a None among them is no ONNX output)
    multi = isinstance(result, (tuple, list))
    is_tensor = [torch.is_tensor(r) for r in result] if multi else [True]
    n_out = sum(is_tensor)
    out_names = ["out"] if not multi else [f"out{i}" for i in range(n_out)]
    outputs = [r for r, t in zip(result if multi else [result], is_tensor) if t]
    data = [t.op != "get_attr" for t in tnodes] + [True] * len(outputs)  # a weight passed as a tensor keeps its shape
    dyn = _dynamic_axes(zip(in_names + out_names, list(examples) + outputs, data), dynamic_batch, dynamic_size) or None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(op, examples, buf, dynamo=False, opset_version=b.opset, input_names=in_names,
                              output_names=out_names, dynamic_axes=dyn, do_constant_folding=True)
    except Exception as e:  # noqa: BLE001 -- any exporter failure is reported with the op's name
        what = node.target if node.op != "call_module" else type(module).__name__
        what = getattr(what, "__name__", what)
        if dynamic_size:  # an adaptive pool to a fixed grid: its kernel follows the input size
            raise SizeDependent(f"the exported graph depends on the input's height and width at {node.name!r} ({what}, "
                                f"which torch.onnx cannot export with symbolic sizes: {' '.join(str(e).split())[:120]})") from e
        msg = (f"{node.name}: {what} has no integer kernel and torch.onnx could not export it in float "
               f"either ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
        later = re.search(r"added in (?:opset )?version (\d+)", str(e))  # torch.onnx names the opset that has it
        raise (NeedsOpset(msg, int(later.group(1))) if later else ExportError(msg)) from e
    sub = onnx.load_from_string(buf.getvalue()).graph
    rename = dict(zip(in_names, inputs))
    outs = [out] if not multi else [b.fresh(f"{out}_{i}") for i in range(n_out)]
    rename.update(zip(out_names, outs))
    base = node.name

    def name_of(v: str) -> str:
        if v == "":
            return v
        if v not in rename:
            rename[v] = b.fresh(f"{base}/{v.strip('/').replace('/', '_') or 'v'}")
        return rename[v]

    for init in sub.initializer:
        t = onnx.TensorProto()
        t.CopyFrom(init)
        t.name = name_of(init.name)
        b.inits.append(t)
    for nd in sub.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in nd.attribute):
            raise ExportError(f"{node.name}: torch.onnx exported it with a control-flow subgraph, which is not spliced")
        new = onnx.NodeProto()
        new.CopyFrom(nd)
        new.ClearField("input")
        new.ClearField("output")
        new.input.extend(name_of(v) for v in nd.input)
        new.output.extend(name_of(v) for v in nd.output)
        new.name = b.fresh(f"{base}/{nd.op_type}")
        b.nodes.append(new)
    produced = {name_of(o) for nd in sub.node for o in nd.output}
    for g, o in zip(sub.output, outs):
        b.names.add(o)
        if o not in produced:  # the exporter passed an input straight through: keep the name with an Identity
            if g.name not in in_names:
                raise ExportError(f"{node.name}: torch.onnx produced no node for its output {g.name}")
            b.nodes.append(onnx.helper.make_node("Identity", [rename[g.name]], [o], name=b.fresh(f"{base}/Identity")))
    if not multi:
        return outs[0]
    it = iter(outs)
    return [next(it) if t else None for t in is_tensor]
