"""Subgraphs that read only parameters and buffers, computed once by the sim at export.

Swin v2's continuous position bias is a small MLP (quantized linear layers, their quantizers, a sigmoid) run on a
constant coordinate table. Exported op by op, ONNX Runtime would rerun it on every inference with its own float kernels
(a float ``Gemm`` on a float buffer), whose last bits differ from torch's, so the deployed model parted from the
integer-exact sim at the first attention block. Here such a subgraph -- any node that depends on no model input and has
a layer or quantizer call among its inputs or itself -- is computed by the sim in :meth:`QuantSim.integer_exact` mode
(with the export's ``tables`` / ``float64`` options) and written as initializers:

* a constant node read by a node that depends on a model input becomes an initializer holding its value; a quantizer
  there keeps its ``QuantizeLinear`` / ``DequantizeLinear`` (on the initializer of its dequantized value, which rounds
  back to the same integers), so ONNX Runtime still fuses the integer kernels that read it and the quantizer's name is
  still in the graph;
* every other node of the subgraph is gone from the file. Its quantizers (and the weight quantizers of its layers) keep
  their encodings (a sim is rebuilt from them) but name no ONNX tensor: :func:`folded_quantizers` lists them.

Plain ops on parameters only (no layer or quantizer among them) stay with the export's own folding
(``onnx_qdq._constant_tensor``), which computes them with torch at export as well.
"""
from __future__ import annotations

import operator
import warnings
from typing import Optional

import torch
from torch import fx

from ..graph import patterns
from ..nn.modules import QuantizedModuleMixin
from ..nn.quantizer import Quantizer


def constant_values(sim, tables: bool = False, float64: bool = False) -> dict[fx.Node, torch.Tensor]:
    """``{node: value}`` for the :func:`~edgequant.graph.patterns.constant_nodes` of ``sim.model`` (get_attr nodes
    aside), computed in the sim's integer-exact mode with the export's options (ONNX Runtime's float32 requantization);
    a layer's float64 exact-mode output is rounded to the float32 it stands for."""
    gm = sim.model
    nodes = patterns.constant_nodes(gm)
    if not any(n.op == "call_module" for n in nodes):
        return {}
    modules = dict(gm.named_modules())
    env: dict[fx.Node, object] = {}
    warned = getattr(sim, "_float_ops_warned", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exact mode's note on float ops is about inference, not this
        with torch.no_grad(), sim.integer_exact("float32", tables=tables, float64=float64):
            for n in nodes:
                env[n] = _run(n, env, gm, modules)
    object.__setattr__(sim, "_float_ops_warned", warned)
    out = {}
    for n in nodes:
        v = env[n]
        if n.op == "get_attr":
            continue
        if isinstance(v, torch.Tensor):
            meta = patterns.recorded_meta(n)
            v = v.float() if v.dtype == torch.float64 and getattr(meta, "dtype", None) == torch.float32 else v.detach()
        out[n] = v
    return out


def _run(n: fx.Node, env: dict, gm, modules):
    if n.op == "get_attr":
        return operator.attrgetter(n.target)(gm)
    return evaluate(n, {a: env[a] for a in n.all_input_nodes}, modules)


def evaluate(n: fx.Node, values: dict, modules: Optional[dict] = None):
    """The value of call node ``n`` on ``values`` (its input nodes' values). Tensors are passed as copies: an in-place op
    (``ReLU(inplace=True)``, ``zero_``) must not touch the model's own parameters and buffers."""
    def arg(v):
        x = values[v]
        return x.detach().clone() if isinstance(x, torch.Tensor) else x

    args, kwargs = fx.node.map_arg((n.args, n.kwargs), arg)
    if n.op == "call_module":
        return modules[n.target](*args, **kwargs)
    if n.op == "call_method":
        return getattr(args[0], n.target)(*args[1:], **kwargs)
    return n.target(*args, **kwargs)


def folded_quantizers(gm: fx.GraphModule) -> set[str]:
    """Names of the quantizers that a folded constant subgraph holds entirely, so no tensor of the ONNX graph carries
    them: tensor quantizers whose every reader is constant too, and the weight quantizers of layers called on constant
    inputs only."""
    nodes = patterns.constant_nodes(gm)
    inside = set(nodes)
    modules = dict(gm.named_modules())
    out: set[str] = set()
    for n in nodes:
        m = patterns.module_of(n, modules)
        if isinstance(m, Quantizer) and n.users and all(u in inside for u in n.users):
            out.add(m.tensor_name)
        elif isinstance(m, QuantizedModuleMixin):
            out.update(q.tensor_name for q in m.param_quantizers.values() if isinstance(q, Quantizer))
    return out
