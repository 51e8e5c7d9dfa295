r"""The sim's integer-exact mode: every output quantizer computes what the deployed integer kernel computes.

The default sim fake-quantizes in float32: a conv sums float32 products and its output quantizer
divides by ``s_y``. A kernel sums integers exactly and multiplies by a requantization multiplier.
Both round the same value, but a value within ~1e-6 of a rounding boundary can land one step
apart, and in a deep network such a flip spreads (on MobileNetV2 w8a8: 3e-4 of the elements after
``features.2``, 48% after ``features.10``). In this mode:

* quantized convs / linears compute in float64 on their fake-quantized inputs and weights -- every
  product of two float32 values is exact in float64, so ``round(y / (s_x s_w[c]))`` recovers the
  exact integer accumulator (bias included, on its int32 grid);
* the output quantizer after a conv/linear (and its fused ReLU/ReLU6/clamp) requantizes that
  accumulator with :func:`edgequant.core.requant.requantize`;
* with ``tables=True``, the output quantizer after an elementwise op (GELU, sigmoid, hard-swish, ...) whose
  input is on a per-tensor grid looks its integers up in the op's table (:mod:`edgequant.core.lut`; the
  ``Gather`` of ``export_onnx(..., tables=True)`` and the integer engine);
* the output quantizer after a matrix product of two 8-bit tensors (``QLinearMatMul``: attention; their
  integers reach it through identity ops or transposes) computes the exact integer product and requantizes it;
* the output quantizer after an add, a product of two 8-bit tensors (``QLinearMul``; a squeeze-excitation
  gate) or a global average pool reads its inputs' integers and applies :func:`~edgequant.core.requant.add`
  / :func:`~edgequant.core.requant.mul` / :func:`~edgequant.core.requant.mean`;
* quantized LSTM / GRU / RNN layers run their cells on integers (:mod:`edgequant.core.recurrent`: integer
  matmuls, lookup tables for sigmoid/tanh, the export's float32 elementwise steps), ``"float32"`` only;
* every other quantizer fake-quantizes as usual (ONNX Runtime runs those ops as
  DequantizeLinear -> float op -> QuantizeLinear, which divides just like the sim). Where that float op
  computes new values (LayerNorm, softmax, a float matmul) rather than moving them, ORT's float kernel can
  round the last bit differently from torch's: the mode lists those quantizers (``float_computed``) and
  warns once per sim;
* with ``float64=True``, LayerNorm, GroupNorm and softmax compute in float64 and round to float32 once
  (:mod:`edgequant.core.float64`), as ``export_onnx(..., float64=True)`` writes them: the rounding to float32
  hides the libraries' last-bit differences, so these ops no longer count as float-computed.

``requant="float32"`` reproduces ONNX Runtime's CPU kernels; ``"fixed_point"`` the gemmlowp/TFLite
multiplier-and-shift (see :mod:`edgequant.core.requant`). Evaluation only: no gradients flow.
"""
from __future__ import annotations

import operator
import warnings
from collections import Counter

import torch
from torch import fx, nn

from ..core import lut
from ..core import requant as rq
from ..core.float64 import Float64Norms
from ..core.granularity import PerChannel, PerTensor
from ..core.quant import bias_integers, bias_scale, dequantize, quantize, storage_offset
from ..errors import NotCalibratedError
from ..graph import lowering, ops, patterns
from ..nn.modules import QuantizedModuleMixin, own_forward
from ..nn.quantizer import Quantizer
from ..nn.rnn import QuantizedRecurrentMixin
from .quantsim import QuantSimWarning


def _per_tensor(q) -> bool:
    return isinstance(q, Quantizer) and isinstance(q.spec.granularity, PerTensor) and q.is_initialized


def _moved_source(n, modules):
    """``(quantizer, moves)``: the quantizer whose integers reach node ``n`` through identity ops and moves that the
    export runs on the stored integers (:func:`~edgequant.graph.lowering.moves_integers`: a transpose, a reshape, a
    zero pad, a roll, a plain selection, a split part) with constant arguments or sizes read from shapes
    (:func:`_shape_read`), and max-pools (exported in float, but ONNX Runtime moves the DequantizeLinear past them),
    the moves in order; ``(None, [])`` otherwise."""
    moves = []
    while isinstance(n, fx.Node):
        if isinstance(patterns.module_of(n, modules), Quantizer):
            return patterns.module_of(n, modules), moves[::-1]
        if ops.is_identity(n, modules) or lowering.empty_pad(n):
            n = n.args[0]
            continue
        if lowering.plain_max_pool(n, modules):  # exported in float, but ORT moves the DequantizeLinear past it (QDQ propagation)
            moves.append(n)
            n = n.args[0]
            continue
        found: list = []
        fx.node.map_arg((n.args[1:], n.kwargs), found.append)
        if n.op not in ("call_method", "call_function") or not lowering.moves_integers(n, modules) or (
                found and _reshaped_to(n) is None and not (n.target is operator.getitem
                                                           and all(_shape_read(f, modules) for f in found))):
            break
        moves.append(n)
        n = n.args[0]
    return None, []


def _shape_owner(t, modules):
    """The quantizer whose output has the shape of node ``t``'s value at run time: ``t`` itself, or the quantizer that
    reads it (a model input, a layer's output); None otherwise."""
    if isinstance(patterns.module_of(t, modules), Quantizer):
        return patterns.module_of(t, modules)
    return next((patterns.module_of(u, modules) for u in t.users
                 if isinstance(patterns.module_of(u, modules), Quantizer)), None)


def _shape_read(v, modules) -> bool:
    """Whether node ``v`` reads a size from a shape the exact mode sees at run time (``x.shape[-2:][0]``,
    ``x.size(2)``: LowFormer's crop ``o[..., :H, :W]`` to its input's size)."""
    if not isinstance(v, fx.Node):
        return True
    if v.op == "call_function" and v.target is getattr and v.args[1:] == ("shape",) or (
            v.op == "call_method" and v.target == "size"):
        return isinstance(v.args[0], fx.Node) and _shape_owner(v.args[0], modules) is not None and all(
            not isinstance(a, fx.Node) for a in v.args[1:])
    return v.op == "call_function" and v.target is operator.getitem and not isinstance(v.args[1], fx.Node) and \
        _shape_read(v.args[0], modules)


def _read_shape(v, modules, tape):
    """The value of a :func:`_shape_read` node in the running forward (shapes from the quantizers' recorded codes)."""
    if not isinstance(v, fx.Node):
        return v
    if v.target is operator.getitem:
        return _read_shape(v.args[0], modules, tape)[v.args[1]]
    shape = tuple(tape[id(_shape_owner(v.args[0], modules))].shape)
    return shape if v.target is getattr or len(v.args) == 1 else shape[v.args[1]]


def _replay(t: torch.Tensor, moves: list, modules, tape) -> torch.Tensor:
    """Apply the recorded moves (:func:`_moved_source`) to integer tensor ``t``, centred on its zero point (a zero pad
    then adds the real value 0; a max-pool pads with -inf and takes maxima of integers, exact in float64; a selection's
    sizes read from shapes are read from ``tape``)."""
    for n in moves:
        if n.target is operator.getitem:
            t = t[fx.node.map_arg(n.args[1], lambda v: _read_shape(v, modules, tape))]
            continue
        shape = _reshaped_to(n)
        m = patterns.module_of(n, modules) if n.op == "call_module" else None
        if m is not None:
            t = m(t.double()).round().long()
        elif n.op == "call_function" and n.target in lowering.MAX_POOL_FUNCTIONS:
            t = n.target(t.double(), *n.args[1:], **n.kwargs).round().long()
        elif shape is not None:
            t = t.reshape(shape)
        else:
            t = getattr(t, n.target)(*n.args[1:], **n.kwargs) if n.op == "call_method" else \
                n.target(t, *n.args[1:], **n.kwargs)
    return t


def _reshaped_to(n):
    """The shape a reshape / view node gives, its first dimension left free (``-1``) as the export writes it when the
    batch is folded with other axes (``x.reshape(B * windows, 49, C)``), or None for other nodes."""
    meta = patterns.recorded_meta(n)
    if n.target not in ("view", "reshape", torch.reshape) or not hasattr(meta, "shape"):
        return None
    return [-1] + list(meta.shape)[1:]


def _without_bias(layer, y: torch.Tensor, shape) -> torch.Tensor:
    """Layer output ``y`` (float64) less the bias its forward added on the bias's own grid (``shape`` broadcasts it over
    the channel axis): the exact products alone."""
    if layer.bias is None:
        return y
    used = layer._quantized_bias(torch.float64)
    return y - (used if used is not None else layer.bias.detach().double()).view(shape)


def _computes_in_float(n, modules) -> bool:
    """Whether node ``n`` computes new float values (a LayerNorm, a softmax, a float matmul), as opposed to reading a
    model input or moving values that are already on a grid (a quantizer, reshapes, selections, concat, pads)."""
    if n.op == "placeholder" or isinstance(patterns.module_of(n, modules), Quantizer) or patterns.is_cat(n):
        return False
    op = ops.node_op(n, modules)
    return not (n.target is operator.getitem or (op is not None and op.kind == "pass"))


def _op_name(n, modules) -> str:
    m = patterns.module_of(n, modules)
    return type(m).__name__ if m is not None else ops.function_name(n.target)


class IntegerExactMode:
    """Context manager behind :meth:`QuantSim.integer_exact`; see the module docstring."""

    def __init__(self, sim, requant: str = "float32", tables: bool = False, float64: bool = False):
        if sim.capture_mode != "graph":
            raise ValueError("integer-exact mode needs a sim built by graph capture (this one fell back to leaf modules)")
        self.mode = rq.check_mode(requant)
        self.tables = tables
        self.float64 = Float64Norms() if float64 else None
        self.gm = sim.model
        self.modules = dict(self.gm.named_modules())
        self.tape: dict[int, torch.Tensor] = {}  # id(quantizer or layer) -> its integers / f64 output
        self.steps: dict[Quantizer, object] = {}
        self.sim = sim
        #: quantizers whose input a float op computes, and the op: ONNX Runtime runs such ops with its own float
        #: kernels, which may round the last bit differently from torch's (then the quantizer lands a step away)
        self.float_computed: dict[str, str] = {}
        self.layers: list[QuantizedModuleMixin] = []
        # recurrent layers run their cells on integers (edgequant.core.recurrent)
        self.recurrent = [m for m in self.modules.values() if isinstance(m, QuantizedRecurrentMixin)]
        # computed once at export from parameters and buffers (export/constants.py): ORT does not recompute them
        self.constant = set(patterns.constant_nodes(self.gm))
        for n in self.gm.graph.nodes:
            q = patterns.module_of(n, self.modules)
            if isinstance(q, Quantizer):
                self.steps[q] = self._plan(n, q)

    # ------------------------------------------------------------------ plan
    def _plan(self, n, q: Quantizer):
        if not _per_tensor(q):
            return self._plain
        base, act = patterns.split_producer(n.args[0], self.modules)
        bm = patterns.module_of(base, self.modules)
        # a layer with its own forward (weight standardization) need not sum its integer weights: fake-quantize
        if isinstance(bm, lowering.INTEGER_WEIGHTED) and isinstance(bm, QuantizedModuleMixin) and not own_forward(bm):
            # the grid of this call's input (a layer called on several inputs, as a detector head on each feature
            # level, has one per call; the export writes its bias once per call)
            q_in = lowering.source_quantizer(base.args[0], self.modules) if base.args else None
            q_w = getattr(bm.param_quantizers, "weight", None)
            if _per_tensor(q_in) and isinstance(q_w, Quantizer) and isinstance(q_w.spec.granularity, (PerTensor, PerChannel)):
                self.layers.append(bm)
                # a wider output grid on tokens: the export's MatMulInteger and float32 rescale (onnx_qdq._linear_nd)
                if (q.spec.bits > 8 and act is None and lowering.linear_on_tokens(base, bm)
                        and lowering.integer_matmul_fits(q_in, q_w)):
                    return lambda qq, x: self._wide(qq, bm, q_in, q_w)
                if q.spec.bits > 8:  # ORT's integer kernels write 8-bit outputs: a float rescale (or a float layer)
                    self.float_computed[q.tensor_name] = f"{type(bm).__name__} to a {q.spec.bits}-bit grid"
                return lambda qq, x: self._weighted(qq, bm, q_in, q_w, act)
        found = lowering.lookup_table(n, self.modules, q.scale.device) if self.tables else None
        if found is not None and _per_tensor(found[2]):
            t, src, q_in = found
            moved, moves = _moved_source(base.args[0], self.modules)  # the codes of a part (MambaOut's split gate)
            if moved is q_in:
                z = q_in.scalar_grid()[1]
                return lambda qq, x: self._out(qq, lut.lookup(
                    t, self._centred(q_in, moves) + z, src).reshape(x.shape))
        # ONNX Runtime fuses DQ -> Mul -> Q into QLinearMul when all three are stored as uint8 (8 bits and fewer,
        # as exported) and no Clip stands before the Q (an output grid narrower than 8 bits has one)
        op = rq.add if patterns.is_add(base) and len(base.args) >= 2 else \
            rq.mul if patterns.is_mul(base) and act is None and q.spec.bits == 8 else None
        if op is not None:
            (qa, ca), (qb, cb) = (_moved_source(a, self.modules) for a in base.args[:2])
            if _per_tensor(qa) and _per_tensor(qb) and (op is rq.add or max(qa.spec.bits, qb.spec.bits) <= 8):
                return lambda qq, x: self._binary(op, qq, (qa, ca), (qb, cb), act, x)
        if patterns.is_matmul(base) and act is None and q.spec.bits <= 8:
            (qa, ca), (qb, cb) = (_moved_source(a, self.modules) for a in base.args[:2])
            if _per_tensor(qa) and _per_tensor(qb) and max(qa.spec.bits, qb.spec.bits) <= 8:
                return lambda qq, x: self._matmul(qq, (qa, ca), (qb, cb), x)
        if patterns.is_global_pool(base, self.modules) and act is None:
            qx, moves = _moved_source(base.args[0], self.modules)  # through selections: BEiT's x[:, 1:].mean(1)
            if _per_tensor(qx):
                return lambda qq, x: self._mean(qq, (qx, moves), base, x)
        exact_float = self.float64 is not None and lowering.float64_op(base, self.modules)  # float64, rounded once
        if _computes_in_float(base, self.modules) and not exact_float and n not in self.constant:
            self.float_computed[q.tensor_name] = _op_name(base, self.modules)
        return self._plain

    # ------------------------------------------------------------------ steps
    def _out(self, q: Quantizer, qi: torch.Tensor) -> torch.Tensor:
        self.tape[id(q)] = qi
        return dequantize(qi.to(torch.int32), q.scale, q.zero_point, q.spec.granularity).to(torch.float32)

    def _plain(self, q: Quantizer, x: torch.Tensor) -> torch.Tensor:
        qi = quantize(x.to(torch.float32), q.scale, q.zero_point, q.qmin, q.qmax, q.spec.granularity)
        return self._out(q, qi.long())

    def _weighted(self, q: Quantizer, layer, q_in: Quantizer, q_w: Quantizer, act) -> torch.Tensor:
        y = self.tape.pop(id(layer))  # the layer's float64 output, before the activation
        s_x, _ = q_in.scalar_grid()
        s_w = q_w.scale.detach().double().reshape(-1)
        if isinstance(layer, nn.Linear):  # channels last, whatever the rank (tokens, channels-last blocks)
            cout, shape = y.shape[-1], [1] * (y.ndim - 1) + [-1]
        else:
            cout = y.shape[1] if y.ndim > 1 else y.shape[0]
            shape = [1, -1] + [1] * (y.ndim - 2) if y.ndim > 2 else [1, -1]
        s_w = s_w.expand(cout) if s_w.numel() == 1 else s_w
        y = _without_bias(layer, y, shape)
        bias_int = None
        if layer.bias is not None:  # the forward added the bias on its own grid: this call's bias integers instead
            bias_int = bias_integers(layer.bias, bias_scale(torch.tensor(s_x, dtype=torch.float64), s_w, cout)).view(shape)
        acc = torch.round(y / (s_x * s_w).view(shape)).long()
        acc = acc + bias_int if bias_int is not None else acc
        acc = rq.wrap_int32(acc)
        s_y, z_y = q.scalar_grid()
        lo, hi = lowering.act_bounds(act, self.modules, s_y, z_y, q.qmin, q.qmax, cout, y.ndim)
        lo, hi = lo.reshape(shape), hi.reshape(shape)  # the layer's channel axis (last for a Linear)
        return self._out(q, rq.requantize(acc, s_x, s_w, s_y, z_y, lo, hi, self.mode, shape))

    def _wide(self, q: Quantizer, layer, q_in: Quantizer, q_w: Quantizer) -> torch.Tensor:
        """A linear layer writing a grid wider than 8 bits as the export runs it: ``MatMulInteger`` (the exact int32
        accumulator), then ``acc * s_x s_w + bias`` in float32, each step rounded as ONNX Runtime rounds it."""
        y = self.tape.pop(id(layer))
        s_x, _ = q_in.scalar_grid()
        s_acc = bias_scale(torch.tensor(s_x, dtype=torch.float64), q_w.scale.detach(), y.shape[-1])
        y = _without_bias(layer, y, [-1])
        out = rq.wrap_int32(torch.round(y / s_acc).long()).float() * s_acc.float()
        if layer.bias is not None:
            out = out + (bias_integers(layer.bias, s_acc).double() * s_acc).float()
        return self._plain(q, out)

    def _binary(self, op, q: Quantizer, a, b, act, x) -> torch.Tensor:
        """``op`` (:func:`~edgequant.core.requant.add` or ``mul``) on the integers of quantizers ``a = (qa, moves)`` and
        ``b``, moved as the graph moves them on the way."""
        (qa, ca), (qb, cb) = a, b
        (s_a, z_a), (s_b, z_b), (s_y, z_y) = qa.scalar_grid(), qb.scalar_grid(), q.scalar_grid()
        a, b = self._centred(qa, ca) + z_a, self._centred(qb, cb) + z_b
        ch = x.shape[1] if x.ndim > 1 else 1
        lo, hi = lowering.act_bounds(act, self.modules, s_y, z_y, q.qmin, q.qmax, ch, max(x.ndim, 2))
        offsets = tuple(storage_offset(t.spec.bits, t.spec.signed) for t in (qa, qb, q))
        return self._out(q, op(a, s_a, z_a, b, s_b, z_b, s_y, z_y, lo, hi, self.mode, offsets).reshape(x.shape))

    def _matmul(self, q: Quantizer, a, b, x) -> torch.Tensor:
        """ONNX Runtime's ``QLinearMatMul``: the exact int32 product of the centred integers, requantized."""
        (qa, ca), (qb, cb) = a, b
        (s_a, _), (s_b, _), (s_y, z_y) = qa.scalar_grid(), qb.scalar_grid(), q.scalar_grid()
        ia, ib = self._centred(qa, ca), self._centred(qb, cb)
        acc = torch.matmul(ia.double(), ib.double()).round().long()  # integers below 2**53: exact
        acc = rq.wrap_int32(acc)
        y = rq.requantize(acc, s_a, torch.tensor([s_b], dtype=torch.float64), s_y, z_y, q.qmin, q.qmax, self.mode)
        return self._out(q, y.reshape(x.shape))

    def _centred(self, q: Quantizer, moves: list) -> torch.Tensor:
        """The integers ``q`` recorded in this forward less its zero point, moved as the graph moves them
        (:func:`_replay`)."""
        return _replay(self.tape[id(q)] - q.scalar_grid()[1], moves, self.modules, self.tape)

    def _mean(self, q: Quantizer, source, node, x) -> torch.Tensor:
        qx, moves = source
        s_x, z_x = qx.scalar_grid()
        v = self._centred(qx, moves)
        dims, keep = patterns.pool_dims(node, self.modules, v.ndim)
        count = 1
        for d in dims:
            count *= v.shape[d]
        acc = v.sum(dim=dims, keepdim=keep)
        s_y, z_y = q.scalar_grid()
        return self._out(q, rq.mean(acc, count, s_x, s_y, z_y, q.qmin, q.qmax, self.mode).reshape(x.shape))

    # ------------------------------------------------------------------ context
    def __enter__(self):
        missing = [q.tensor_name for q in self.steps if not q.is_initialized]
        if missing:
            raise NotCalibratedError(f"quantizers without an encoding: {', '.join(missing[:5])}; calibrate the sim first")
        self._hooks = []
        for layer in self.layers:
            layer._exact_f64 = True
            # cloned: an in-place activation (torchvision's ReLU6(inplace=True)) would clamp the stored tensor
            self._hooks.append(layer.register_forward_hook(lambda m, i, o: self.tape.__setitem__(id(m), o.clone())))
        for q, step in self.steps.items():
            q._exact = step
        for m in self.recurrent:
            m._exact_requant = self.mode
        self._grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        if self.float64 is not None:
            self.float64.__enter__()
        if self.float_computed and not getattr(self.sim, "_float_ops_warned", False):
            object.__setattr__(self.sim, "_float_ops_warned", True)  # once per sim
            kinds = Counter(self.float_computed.values())
            warnings.warn(
                f"integer_exact: {len(self.float_computed)} quantizer(s) read ops computed in float "
                f"({', '.join(f'{k} x{v}' for k, v in kinds.most_common(6))}): ONNX Runtime runs them with its own float "
                "kernels, which can round the last bit differently from torch's, so those outputs (and what follows) "
                "can land a step away from the deployed ones. Elementwise ops are exact as tables, normalizations and "
                "softmax in float64: integer_exact(tables=True, float64=True) with export_onnx(..., tables=True, "
                "float64=True)", QuantSimWarning, stacklevel=3)
        return self

    def __exit__(self, *exc):
        if self.float64 is not None:
            self.float64.__exit__(*exc)
        torch.set_grad_enabled(self._grad)
        for h in self._hooks:
            h.remove()
        for layer in self.layers:
            layer._exact_f64 = False
        for q in self.steps:
            q._exact = None
        for m in self.recurrent:
            m._exact_requant = None
        self.tape.clear()
        return False
