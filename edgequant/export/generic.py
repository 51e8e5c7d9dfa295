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
import re
import warnings
from typing import Optional

import onnx
import torch
from torch import fx, nn

from ..errors import ExportError
from ..graph.patterns import recorded_meta


class NeedsOpset(ExportError):
    """torch.onnx exports the op only from opset :attr:`opset` on (``F.fold``: Col2Im, 18)."""

    def __init__(self, message: str, opset: int):
        super().__init__(message)
        self.opset = opset


class _OneOp(nn.Module):
    """``forward(*tensors)`` calls the node's target with its constant arguments filled back in."""

    def __init__(self, node: fx.Node, module: Optional[nn.Module], consts: dict):
        super().__init__()
        self.node, self.inner, self.consts = node, module, consts

    def forward(self, *tensors):
        it = iter(tensors)
        fill = lambda v: (self.consts[v] if v in self.consts else next(it)) if isinstance(v, fx.Node) else v  # noqa: E731
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


def _example(n: fx.Node) -> torch.Tensor:
    meta = recorded_meta(n)
    if meta is None or not hasattr(meta, "shape"):
        raise ExportError(f"{n.name}: no recorded shape for an input of a generically exported op")
    if meta.dtype.is_floating_point:
        return torch.randn(tuple(meta.shape)).to(meta.dtype)
    return torch.zeros(tuple(meta.shape), dtype=meta.dtype)


def export_one(b, node: fx.Node, module: Optional[nn.Module], inputs: list[str], out: str, dynamic_batch: bool,
               consts: dict) -> str:
    """Splice the ONNX of ``node`` (``inputs``: the ONNX names of its tensor arguments, in argument
    order; ``consts``: argument nodes folded to Python values) into builder ``b``; its output gets the
    name ``out``. Raises ExportError naming the op when torch's exporter cannot export it either."""
    tnodes = tensor_nodes(node, consts)
    if len(tnodes) != len(inputs):
        raise ExportError(f"{node.name}: {len(inputs)} ONNX inputs for {len(tnodes)} tensor arguments")
    examples = tuple(_example(t) for t in tnodes)
    in_names = [f"in{i}" for i in range(len(examples))]
    buf = io.BytesIO()
    op = _OneOp(node, module, consts).eval()
    with torch.no_grad():
        result = op(*examples)
    # chunk, split, unbind, MultiheadAttention: several outputs (a None among them is no ONNX output)
    multi = isinstance(result, (tuple, list))
    is_tensor = [torch.is_tensor(r) for r in result] if multi else [True]
    n_out = sum(is_tensor)
    out_names = ["out"] if not multi else [f"out{i}" for i in range(n_out)]
    dyn = None
    if dynamic_batch:
        dyn = {name: {0: "N"} for name, x in zip(in_names, examples) if x.dim() > 0}
        dyn.update({o: {0: "N"} for o in out_names})
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(op, examples, buf, dynamo=False, opset_version=b.opset, input_names=in_names,
                              output_names=out_names, dynamic_axes=dyn, do_constant_folding=True)
    except Exception as e:  # noqa: BLE001 -- any exporter failure is reported with the op's name
        what = node.target if node.op != "call_module" else type(module).__name__
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
