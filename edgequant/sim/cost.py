r"""The cost model of a quantized network: per layer and in total, what it computes and moves.

For every conv / linear layer of a sim (measured with one forward pass on the example inputs):

* ``macs``: multiply-accumulates, ``output elements x (C_in / groups x kernel size)`` (``x in_features`` for linear);
* ``bops``: bit operations, ``macs x weight bits x input bits`` (32 for a float operand), the budget of
  mixed precision (Baskin et al.; van Baalen et al. use the same product);
* ``weight_bytes``: the weights at their bit-width;
* ``energy_pj``: an estimate from the 45 nm energies of Horowitz, "Computing's energy problem (and what
  we can do about it)", ISSCC 2014: an 8-bit integer multiply 0.2 pJ and add 0.03 pJ, a 32-bit float
  multiply 3.7 pJ and add 0.9 pJ; a multiply of ``a x b`` bits is scaled as ``0.2 pJ x a b / 64`` (array
  multipliers grow with the product of the widths), the accumulate as a 32-bit integer add (0.1 pJ);
  weights are read once from DRAM at 640 pJ per 32 bits (20 pJ per byte) and activations from an 8 KB
  SRAM at 10 pJ per 32 bits. These are orders of magnitude for comparing configurations, not a
  prediction for a particular chip.

The peak activation memory follows the graph: at each op, the bytes of the values still alive (each
at the bit-width of its quantizer, 32 bits when float).

>>> import torch
>>> from torch import nn
>>> from edgequant import QuantSim
>>> sim = QuantSim(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), torch.randn(1, 3, 10, 10), "w8a8")
>>> c = cost(sim)
>>> c.layers[0].macs, c.layers[0].bops == c.layers[0].macs * 8 * 8
(13824, True)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import fx, nn

from ..batches import as_args, evaluating, map_tensors, to_device
from ..nn.modules import float_class_of
from ..nn.quantizer import Quantizer

#: Horowitz 2014, 45 nm (pJ)
INT8_MULT_PJ, INT32_ADD_PJ = 0.2, 0.1
FP32_MULT_PJ, FP32_ADD_PJ = 3.7, 0.9
DRAM_PJ_PER_BYTE, SRAM_PJ_PER_BYTE = 640 / 4, 10 / 4


@dataclass
class LayerCost:
    name: str
    kind: str
    macs: int
    weight_bits: int
    input_bits: int
    bops: int
    weight_bytes: float
    energy_pj: float


@dataclass
class Cost:
    """Per-layer costs and totals; ``peak_activation_bytes`` follows the graph (0 in leaf mode)."""
    layers: list[LayerCost] = field(default_factory=list)
    peak_activation_bytes: float = 0.0

    def total(self, what: str) -> float:
        """The sum of one ``LayerCost`` field over the layers."""
        return sum(getattr(c, what) for c in self.layers)

    macs = property(lambda self: int(self.total("macs")), doc="multiply-accumulates in total")
    bops = property(lambda self: int(self.total("bops")), doc="bit operations in total")
    weight_bytes = property(lambda self: self.total("weight_bytes"), doc="weight memory in total")
    energy_pj = property(lambda self: self.total("energy_pj"), doc="energy estimate in total (pJ)")

    def to_dict(self) -> dict:
        return {"macs": self.macs, "bops": self.bops, "weight_bytes": self.weight_bytes, "energy_pj": self.energy_pj,
                "peak_activation_bytes": self.peak_activation_bytes, "layers": [asdict(c) for c in self.layers]}

    def __str__(self) -> str:
        return (f"{self.macs / 1e6:.1f} M MACs, {self.bops / 1e9:.2f} G bit-ops, weights {self.weight_bytes / 1e6:.2f} MB, "
                f"peak activations {self.peak_activation_bytes / 1e6:.2f} MB, ~{self.energy_pj / 1e6:.1f} uJ per inference "
                "(45 nm estimate)")


def _bits(q) -> int:
    return q.spec.bits if isinstance(q, Quantizer) else 32


def _mac_energy(wb: int, ab: int) -> float:
    if wb >= 32 or ab >= 32:
        return FP32_MULT_PJ + FP32_ADD_PJ
    return INT8_MULT_PJ * wb * ab / 64 + INT32_ADD_PJ


def _layer_cost(name: str, m: nn.Module, shapes: tuple) -> LayerCost:
    pq = getattr(m, "param_quantizers", {})
    wb = _bits(pq["weight"] if "weight" in pq else None)
    q_in = m._bias_input[0][m._bias_input[1]] if getattr(m, "_bias_input", None) is not None else None
    ab = _bits(q_in)
    x_shape, y_shape = shapes
    per_elem = m.weight[0].numel()  # conv/linear: MACs per output element; transposed conv: per input element
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        macs = 0
    elif isinstance(m, nn.modules.conv._ConvTransposeNd):
        macs = x_shape.numel() * per_elem
    else:
        macs = y_shape.numel() * per_elem
    wbytes = m.weight.numel() * wb / 8
    in_bytes = x_shape.numel() * ab / 8
    energy = macs * _mac_energy(wb, ab) + wbytes * DRAM_PJ_PER_BYTE + in_bytes * SRAM_PJ_PER_BYTE
    kind = float_class_of(type(m)).__name__
    return LayerCost(name, kind, int(macs), wb, ab, int(macs) * wb * ab, wbytes, energy)


_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.conv._ConvTransposeNd, nn.Embedding, nn.EmbeddingBag)


@torch.no_grad()
def cost(sim) -> Cost:
    """The cost model of ``sim`` per inference (see the module docstring): one float forward pass on the
    first sample of its example inputs."""
    from .prepare import propagate_shapes

    shapes: dict[str, tuple] = {}
    layers = {n: m for n, m in sim.model.named_modules() if isinstance(m, _LAYERS)}
    def record(name):
        def hook(mod, inputs, output):
            shapes.setdefault(name, (inputs[0].shape, output.shape))  # returns None: the output is kept
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in layers.items()]
    # costs are per inference: the example inputs cut to their first sample
    one = map_tensors(lambda t: t[:1] if t.dim() > 0 else t, sim._example_inputs)
    args, kwargs = as_args(to_device(one, sim.device))
    bits = {f"activation_quantizers.{k}": q.spec.bits for k, q in sim.activation_quantizers.items() if isinstance(q, Quantizer)}
    result = Cost()
    try:
        with evaluating(sim), sim.quantization_disabled():
            sim(*args, **kwargs)
            if sim.capture_mode == "graph":
                propagate_shapes(sim.model, args, kwargs)
                result.peak_activation_bytes = _peak_activation_bytes(sim.model, bits)
    finally:
        for h in hooks:
            h.remove()
    result.layers = [_layer_cost(n, m, shapes[n]) for n, m in layers.items() if n in shapes]  # quantizers enabled again
    return result


def _peak_activation_bytes(gm: fx.GraphModule, bits: dict[str, int]) -> float:
    """Largest sum of live values' bytes over the graph's ops (each value at its quantizer's bit-width)."""
    from ..graph import ops, patterns

    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}

    def alias(n):  # reshape-like ops move no data; so do the quantizer slots (Identity while disabled)
        return ops.keeps_grid(n, modules)

    def end(n):  # a fused kernel (conv -> bn -> relu) reads its input until its last op
        while patterns.in_supergroup(n, modules):
            n = patterns.sole_user(n, modules)
        return order[n]

    last: dict = {}
    for n in reversed(nodes):
        last[n] = max((last[u] if alias(u) else end(u) for u in n.users), default=order[n])
    size = {}
    for n in nodes:
        meta = n.meta.get("tensor_meta")
        if not hasattr(meta, "shape") or alias(n) or patterns.in_supergroup(n, modules):
            continue  # a fused kernel never stores its intermediates
        b = next((bits[u.target] for u in n.users if u.op == "call_module" and u.target in bits), 32)
        size[n] = meta.shape.numel() * b / 8
    peak, live = 0.0, {}
    for i, n in enumerate(gm.graph.nodes):
        if n in size:
            live[n] = size[n]
        peak = max(peak, sum(live.values()))
        live = {v: b for v, b in live.items() if last[v] > i}
    return peak
