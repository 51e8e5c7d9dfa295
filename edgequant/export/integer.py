r"""An integer-only reference engine: runs a calibrated sim the way an int8 accelerator does.

Every value between the input and the output is an integer tensor ``q`` on a grid ``(s, z)``; the
real value it stands for is ``s (q - z)``. Only the model input is quantized from float and only the
output is dequantized back.

**Conv / linear** (weights symmetric, ``z_w = 0``; any bit-width):

.. math::
    acc_c = \sum_k q_w[c,k]\, q_x[k] \;+\; \underbrace{\big(b_q[c] - z_x \sum_k q_w[c,k]\big)}_{\text{folded bias}},
    \qquad b_q = \mathrm{round}\big(b / (s_x s_w[c])\big)

accumulated in int32 (checked for overflow), then requantized to the output grid by the scheme
``requant`` names (:mod:`edgequant.core.requant`):

* ``"fixed_point"`` (default; gemmlowp/TFLite, rounding half to even as ONNX does):

  .. math::
      M_c = s_x s_w[c] / s_y = M_0 \cdot 2^{-n},\ M_0 \in [2^{30}, 2^{31}),\qquad
      q_y = \mathrm{clamp}\big(\mathrm{rne}(acc_c M_0 / 2^n) + z_y,\ lo_c,\ hi_c\big)

* ``"float32"``: ONNX Runtime's CPU kernels, ``q_y = rne(fp32(acc_c) \cdot fp32(s_x s_w[c] / s_y)) + z_y``.

``lo``/``hi`` are the grid limits intersected with the fused activation (ReLU, ReLU6, per-channel
clamp) mapped onto the output grid. **Add**: fixed point brings both inputs to a common scale with
left-shifted multipliers (TFLite's scheme, 20 bits of headroom), sums in int64 and requantizes;
float32 is ORT's fused multiply-add on the stored (uint8) integers. **Global average pooling**: an
int32 sum, requantized with ``M = s_x / (s_y HW)``. **Elementwise ops** (GELU, sigmoid, hard-swish, ...)
between two per-tensor grids: a lookup table from code to code (:mod:`edgequant.core.lut`). Max pooling,
flatten, reshape and dropout move integers without arithmetic.

**Agreement with the sim.** The float sim accumulates in float32 and divides by ``s_y``; a value
within about ``1e-6`` of a rounding boundary lands one step away from the engine's, and in a deep
network such a flip grows (MobileNetV2: 16% of logits identical). ``sim.integer_exact(requant)``
computes the exact accumulators and the same requantization, and then agrees with the engine bit
for bit -- and, with ``"float32"``, with ONNX Runtime. The two schemes differ from each other as much
as the float sim differs from either: a sim is exact only for the arithmetic of its target.

Integer convolutions are computed as float64 convolutions of integer-valued tensors: every product
and partial sum is an integer below ``2^53``, so float64 represents it exactly, and the result is
converted back to int64 and checked against the int32 range.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..core import lut
from ..core import requant as rq
from ..core.granularity import PerChannel, PerTensor
from ..core.quant import INT32_MAX, INT32_MIN, bias_integers, bias_scale, quantize, storage_offset
from ..errors import IntegerEngineError, NotCalibratedError
from ..graph import lowering, ops, patterns
from ..nn.modules import float_class_of, own_forward
from ..nn.padded import PaddedConv2d
from ..nn.quantizer import Quantizer
from ..nn.rnn import QuantizedRecurrentMixin


@dataclass
class QTensor:
    """Integers ``q`` (int64) standing for ``scale * (q - zero_point)``."""
    q: torch.Tensor
    scale: float
    zero_point: int
    offset: int = 0  # what the ONNX export adds to store it (see core.quant.storage_offset)

    def dequantize(self) -> torch.Tensor:
        return (self.q - self.zero_point).to(torch.float32) * self.scale


def _check_int32(acc: torch.Tensor, where: str) -> None:
    lo, hi = int(acc.min()), int(acc.max())
    if lo < INT32_MIN or hi > INT32_MAX:
        raise IntegerEngineError(f"{where}: int32 accumulator overflow (range {lo}..{hi})")


class IntegerEngine:
    """Integer-only execution of a calibrated, graph-captured :class:`~edgequant.QuantSim`.

    ``engine(x)`` returns the dequantized output; ``engine.run(x)`` returns the output
    :class:`QTensor`. Raises :class:`IntegerEngineError` at construction naming the first op it
    cannot run in integers.
    """

    def __init__(self, sim, requant: str = "fixed_point"):
        self.requant = rq.check_mode(requant)
        if sim.capture_mode != "graph":
            raise IntegerEngineError("the integer engine needs a sim built by graph capture")
        missing = [n for n, q in sim.quantizers().items() if not q.is_initialized]
        if missing:
            raise NotCalibratedError(f"quantizers without an encoding: {', '.join(missing[:5])}; calibrate the sim first")
        self.sim = sim
        self.gm = sim.model
        self.modules = dict(self.gm.named_modules())
        self._check()

    # ---------------------------------------------------------------- structure
    def _mod(self, n):
        return patterns.module_of(n, self.modules)

    def _is_pass(self, n) -> bool:
        return ops.keeps_grid(n, self.modules)

    def _producer(self, src):
        return patterns.split_producer(src, self.modules)

    def _check(self):
        for n in self.gm.graph.nodes:
            m = self._mod(n)
            if isinstance(m, QuantizedRecurrentMixin):
                self._check_recurrent(n, m)
            if isinstance(m, Quantizer):
                if not isinstance(m.spec.granularity, PerTensor):
                    raise IntegerEngineError(f"{m.tensor_name}: per-tensor activation grids only")
                base, _ = self._producer(n.args[0])
                bm = self._mod(base)
                ok = base.op == "placeholder" or isinstance(bm, (nn.Conv1d, nn.Conv2d, nn.Linear)) \
                    or patterns.is_add(base) or self._is_global_pool(base) \
                    or patterns.is_cat(base) \
                    or (base.op == "call_method" and base.target == "mean") or self._is_pass(base) \
                    or isinstance(self._mod(base), Quantizer) or lowering.lookup_table(n, self.modules) is not None
                if not ok:
                    raise IntegerEngineError(self._unsupported(base))
                if isinstance(bm, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                    if own_forward(bm):
                        raise IntegerEngineError(f"{base.target}: {type(bm).__name__} computes in its own forward; the engine "
                                                 "runs layers from their attributes and would compute it differently")
                    wq = getattr(bm.param_quantizers, "weight", None)
                    if not isinstance(wq, Quantizer) or not wq.spec.symmetric:
                        raise IntegerEngineError(f"{base.target}: needs a symmetric weight quantizer (zero point 0)")
                    if isinstance(bm, nn.Conv2d) and (isinstance(bm.padding, str) or bm.padding_mode != "zeros"):
                        raise IntegerEngineError(f"{base.target}: only zero padding with explicit sizes")

    def _check_recurrent(self, n, m) -> None:
        if self.requant != "float32":
            raise IntegerEngineError(f"{n.target}: quantized {float_class_of(type(m)).__name__} layers run with requant='float32' "
                                     "(ONNX Runtime's arithmetic, edgequant.core.recurrent); a fixed-point cell is not implemented")

    def _recurrent(self, n, m, env) -> list:
        """A quantized LSTM / GRU / RNN on integers (the cell of :mod:`edgequant.core.recurrent`)."""
        x = env[n.args[0]]
        if not isinstance(x, QTensor) or x.q.dim() != 3:
            raise IntegerEngineError(f"{n.target}: its input must be a quantized (batch, time, features) tensor")
        codes = x.q.transpose(0, 1) if m.batch_first else x.q
        hx = n.args[1] if len(n.args) > 1 else n.kwargs.get("hx")  # float initial states go onto their grids
        hx = fx.node.map_aggregate(hx, lambda v: _float(env[v]) if isinstance(v, fx.Node) else v)
        h0, c0 = m._initial(hx, codes.shape[1], torch.float32, codes.device)
        saved, m._exact_requant = m._exact_requant, "float32"
        try:
            out, h_n, c_n = m.run_layers(codes, h0, c0, exact=True)
            grids = {s: m._grid(s) for s in [f"l{m.num_layers - 1}.h"] + m.state_tensors("h") + m.state_tensors("c")
                     if m.mode == "LSTM" or not s.endswith(".c")}
        except ValueError as e:
            raise IntegerEngineError(f"{n.target}: {e}") from None
        finally:
            m._exact_requant = saved

        def qt(t, suffix):
            g = grids[suffix]
            q = m._quantizer(suffix)
            return QTensor(t, g.scale, g.zero_point, storage_offset(q.spec.bits, q.spec.signed))

        def stack(ts, suffixes):  # one QTensor when every slice shares a grid, else one per layer and direction
            parts = [qt(t, sfx) for t, sfx in zip(ts, suffixes)]
            if len(set(suffixes)) == 1:
                return QTensor(torch.stack([p.q for p in parts]), parts[0].scale, parts[0].zero_point, parts[0].offset)
            return parts

        last = f"l{m.num_layers - 1}.h"
        y = qt(out.transpose(0, 1) if m.batch_first else out, last)
        hs = stack(h_n, m.state_tensors("h"))
        return [y, [hs, stack(c_n, m.state_tensors("c"))]] if m.mode == "LSTM" else [y, hs]

    def _is_global_pool(self, n) -> bool:
        return patterns.is_global_pool(n, self.modules)

    def _unsupported(self, n) -> str:
        m = self._mod(n)
        what = type(m).__name__ if m is not None else getattr(n.target, "__name__", str(n.target))
        return (f"{n.name} ({what}) has no integer implementation; the engine runs conv, linear, add, "
                "ReLU/ReLU6/clamps, max/global-average pooling, concat, flatten/reshape, and elementwise ops (GELU, "
                "sigmoid, hard-swish, ...) between per-tensor grids as lookup tables")

    # ---------------------------------------------------------------- run
    @torch.no_grad()
    def run(self, *inputs: torch.Tensor) -> QTensor:
        env: dict[fx.Node, object] = {}
        pos = list(inputs)
        out = None
        for n in self.gm.graph.nodes:
            m = self._mod(n)
            if n.op == "placeholder":
                env[n] = pos.pop(0)
            elif isinstance(m, Quantizer):
                env[n] = self._quantized(n, m, env)
                env[n].offset = storage_offset(m.spec.bits, m.spec.signed)
            elif isinstance(m, QuantizedRecurrentMixin):
                env[n] = self._recurrent(n, m, env)
            elif n.op == "output":
                out = env[n.args[0]]
            elif n.target is operator.getitem and isinstance(env.get(n.args[0]), (list, tuple)):
                if not isinstance(n.args[1], int):
                    raise IntegerEngineError(f"{n.name}: selects {n.args[1]!r} from states on several grids; index one layer")
                env[n] = env[n.args[0]][n.args[1]]
            elif n.target is operator.getitem and isinstance(env.get(n.args[0]), QTensor):  # a selection moves integers
                x = env[n.args[0]]
                env[n] = QTensor(x.q[n.args[1]], x.scale, x.zero_point, x.offset)
            elif self._is_pass(n) and isinstance(env.get(n.args[0]), QTensor):
                x = env[n.args[0]]
                # centred on the zero point: a zero pad adds the real value 0
                env[n] = QTensor(self._apply_pass(n, x.q - x.zero_point) + x.zero_point, x.scale, x.zero_point, x.offset)
            else:
                env[n] = n  # computed lazily by the quantizer that consumes it
        if not isinstance(out, QTensor):
            raise IntegerEngineError("the model output is not quantized (its output quantizer is disabled?)")
        return out

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.run(*inputs).dequantize()

    def _apply_pass(self, n, q: torch.Tensor) -> torch.Tensor:
        m = self._mod(n)
        if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            return m(q.double()).long()  # max of integers is exact in float64
        if isinstance(m, nn.Flatten):
            return q.flatten(m.start_dim, m.end_dim)
        if m is not None or ops.is_identity(n, self.modules):
            return q
        args = [a for a in n.args[1:]]
        if n.op == "call_method":
            return getattr(q, n.target)(*args, **n.kwargs)
        return n.target(q, *args, **n.kwargs)

    def _clamp_bounds(self, act, s_y: float, z_y: int, q: Quantizer, channels: int, ndim: int):
        return lowering.act_bounds(act, self.modules, s_y, z_y, q.qmin, q.qmax, channels, ndim)

    def _quantized(self, n, q: Quantizer, env) -> QTensor:
        s_y, z_y = q.scalar_grid()
        src = n.args[0]
        val = env[src]
        if isinstance(val, QTensor):  # a pass-through chain ended on a quantized value: requantize it
            return self._rescale(val, s_y, z_y, q.qmin, q.qmax)
        if isinstance(val, torch.Tensor):  # the float model input
            return QTensor(quantize(val, q.scale, q.zero_point, q.qmin, q.qmax).long(), s_y, z_y)
        base, act = self._producer(src)
        bm = self._mod(base)
        if isinstance(env.get(base), QTensor):  # an activation applied to an already quantized value
            y = self._rescale(env[base], s_y, z_y, q.qmin, q.qmax)
            lo, hi = self._clamp_bounds(act, s_y, z_y, q, y.q.shape[1] if y.q.ndim > 1 else 1, y.q.ndim)
            return QTensor(torch.maximum(torch.minimum(y.q, hi), lo), s_y, z_y)
        if isinstance(bm, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            return self._weighted(base, bm, env[base.args[0]], act, q, s_y, z_y)
        if patterns.is_add(base):
            a, b = env[base.args[0]], env[base.args[1]]
            return self._add(a, b, act, q, s_y, z_y)
        if self._is_global_pool(base):
            return self._global_pool(env[base.args[0]], q, s_y, z_y, base)
        found = lowering.lookup_table(n, self.modules)
        if found is not None:
            t, src, _ = found
            x = env[base.args[0]]
            return QTensor(lut.lookup(t.to(x.q.device), x.q, src), s_y, z_y)
        if patterns.is_cat(base):
            dim = base.kwargs.get("dim", base.args[1] if len(base.args) > 1 else 0)
            parts = [self._rescale(env[p], s_y, z_y, q.qmin, q.qmax).q for p in base.args[0]]
            return QTensor(torch.cat(parts, dim=dim), s_y, z_y)
        raise IntegerEngineError(self._unsupported(base))

    def _rescale(self, x: QTensor, s_y: float, z_y: int, qmin: int, qmax: int) -> QTensor:
        return QTensor(rq.rescale(x.q, x.scale, x.zero_point, s_y, z_y, qmin, qmax, self.requant), s_y, z_y)

    def _weighted(self, node, m, x: QTensor, act, q: Quantizer, s_y, z_y) -> QTensor:
        if not isinstance(x, QTensor):
            raise IntegerEngineError(f"{node.target}: its input is not quantized")
        wq: Quantizer = m.param_quantizers["weight"]
        w_int = quantize(m.weight.detach(), wq.scale, wq.zero_point, wq.qmin, wq.qmax, wq.spec.granularity).long()
        cout = w_int.shape[0]
        s_w = wq.scale.detach().double().reshape(-1)
        s_w = s_w.expand(cout) if s_w.numel() == 1 else s_w
        if not isinstance(wq.spec.granularity, (PerTensor, PerChannel)):
            raise IntegerEngineError(f"{node.target}: blocked weights have no single accumulator scale")
        bias = m.bias if m.bias is not None else torch.zeros(cout, dtype=torch.float64)
        b_q = bias_integers(bias, bias_scale(x.scale, wq.scale, cout)).to(w_int.device)
        groups = getattr(m, "groups", 1)
        # zero point of the input folded into the bias: sum_k w[c, k] * (q_x - z_x) = w.q_x - z_x * sum_k w[c, k]
        b_fold = b_q - x.zero_point * w_int.reshape(cout, -1).sum(1)
        if isinstance(m, nn.Linear):
            acc = torch.matmul(x.q, w_int.t())  # int64 matmul
            shape = [1] * (acc.ndim - 1) + [-1]
        else:
            conv = F.conv1d if isinstance(m, nn.Conv1d) else F.conv2d
            xq = x.q.double()
            if isinstance(m, PaddedConv2d):  # per-side zero padding: the real value 0 is the integer z_x
                xq = F.pad(xq, m.pads, value=float(x.zero_point))
            acc = conv(xq, w_int.double(), None, m.stride, m.padding, m.dilation, groups)
            acc = acc.round().long()  # integers below 2**53 are exact in float64
            shape = [1, -1] + [1] * (acc.ndim - 2)
        # zero padding pads with the real value 0, i.e. q = z_x: the conv above padded q with 0 instead,
        # so the padded taps contributed 0 where they should contribute z_x * w; correct exactly:
        if not isinstance(m, nn.Linear) and x.zero_point != 0 and any(p != 0 for p in _tuple(m.padding)):
            ones = torch.ones_like(x.q, dtype=torch.float64)
            inside = conv(ones, w_int.double(), None, m.stride, m.padding, m.dilation, groups).round().long()
            total = w_int.reshape(cout, -1).sum(1).view(shape)
            acc = acc + x.zero_point * (total - inside)
        acc = acc + b_fold.view(shape)
        _check_int32(acc, str(node.target))
        lo, hi = self._clamp_bounds(act, s_y, z_y, q, cout, acc.ndim)
        if isinstance(m, nn.Linear):
            lo, hi = lo.view(shape), hi.view(shape)
        return QTensor(rq.requantize(acc, x.scale, s_w, s_y, z_y, lo, hi, self.requant, shape), s_y, z_y)

    def _add(self, a: QTensor, b: QTensor, act, q: Quantizer, s_y, z_y) -> QTensor:
        if not (isinstance(a, QTensor) and isinstance(b, QTensor)):
            raise IntegerEngineError("add: both inputs must be quantized")
        lo, hi = self._clamp_bounds(act, s_y, z_y, q, a.q.shape[1] if a.q.ndim > 1 else 1, max(a.q.ndim, b.q.ndim))
        offsets = (a.offset, b.offset, storage_offset(q.spec.bits, q.spec.signed))
        return QTensor(rq.add(a.q, a.scale, a.zero_point, b.q, b.scale, b.zero_point, s_y, z_y, lo, hi, self.requant, offsets),
                       s_y, z_y)

    def _global_pool(self, x: QTensor, q: Quantizer, s_y, z_y, node) -> QTensor:
        dims, keep = patterns.pool_dims(node, self.modules, x.q.ndim)
        count = 1
        for d in dims:
            count *= x.q.shape[d]
        acc = (x.q - x.zero_point).sum(dim=dims, keepdim=keep)
        _check_int32(acc, "global average pool")
        return QTensor(rq.mean(acc, count, x.scale, s_y, z_y, q.qmin, q.qmax, self.requant), s_y, z_y)


def _float(v):
    """A float value for an op that takes one (a quantized value dequantized)."""
    return v.dequantize() if isinstance(v, QTensor) else v


def _tuple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)
