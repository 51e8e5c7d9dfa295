"""ONNX export with QuantizeLinear/DequantizeLinear pairs, built straight from the sim's graph.

Each fx node of the sim becomes ONNX nodes by a table (:data:`_MODULE_OPS`, :data:`_FUNCTION_OPS`);
each quantizer becomes a Q/DQ pair on the tensor that carries its name, so the encodings file and the
ONNX graph match one to one by construction (and a check verifies it; quantizers inside a subgraph on parameters and
buffers only, which the sim computes at export, name no tensor: :mod:`edgequant.export.constants`):

* activation ``name`` -> the ONNX value ``name`` feeds ``QuantizeLinear`` -> ``DequantizeLinear``;
* weight ``layer.weight`` -> an integer initializer ``layer.weight`` (int8/uint8, int4/uint4 or
  int16 with opset 21) feeding ``DequantizeLinear`` (per-tensor, per-axis on the output-channel axis,
  or blocked with ``block_size``);
* bias -> an int32 initializer ``layer.bias`` with scale ``s_in * s_w`` and zero point 0, when the
  layer's input comes from a per-tensor activation quantizer and its weight is quantized.

Activations of at most 8 bits are always stored as uint8 (:func:`~edgequant.core.quant.storage_offset`: a signed grid ``(q, z)`` is the same grid as
``(q + 128, z + 128)``), because ONNX Runtime fuses only when a conv's input and output types match.
Grids narrower than their container (a narrow range, or 2-7 bits) get a ``Clip`` to the grid's float
range before ``QuantizeLinear``, which rounds to the same integers as the sim. ONNX Runtime fuses the
DQ -> op -> Q patterns into its integer kernels (QLinearConv, QLinearAdd, ...).
"""
from __future__ import annotations

import contextlib
import math
import operator
import os
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn

from ..batches import as_args
from ..core.float64 import Float64Norms
from ..core.granularity import PerBlock, PerChannel, PerTensor
from ..core.quant import bias_integers, bias_scale, grid_range, quantize, storage_offset
from ..errors import ExportError, NotCalibratedError
from ..graph import lowering, ops, patterns
from ..io.encodings import to_edgequant, write_files_together
from ..nn.clamp import ChannelClamp
from ..nn.modules import own_forward
from ..nn.padded import conv_pads
from ..nn.quantizer import Quantizer
from ..nn.rnn import QuantizedRecurrentMixin
from ..nn.scale import ChannelScale
from . import generic as generic_export
from .constants import constant_values, evaluate, folded_quantizers
from .dynamic import SizeDependent, has_symbolic_size, with_dynamic_size

#: methods that are no-ops in an exported graph (besides the identity ops)
_NOOP_METHODS = {"to", "cpu", "cuda", "type_as", "contiguous", "float"}


#: arithmetic and comparisons on shape values (``torch._assert(h == self.image_size)`` in ViT)
_INT_OPS = {operator.mul, operator.add, operator.sub, operator.floordiv, operator.truediv, operator.eq, operator.ne,
            operator.lt, operator.le, operator.gt, operator.ge, operator.mod, operator.neg, operator.pow,
            math.ceil, math.floor, math.sqrt, int, float, max, min, torch.sym_float, torch.sym_int}


class _NoMapping(ExportError):
    """No hand-written mapping: the generic path (:mod:`edgequant.export.generic`) exports the op."""


def _static_value(n: fx.Node, folded: dict, shape_of):
    """Shape arithmetic folded to Python values from the recorded shapes (``x.size()``, ``x.size(0)``,
    ``x.shape``, ``x.shape[1]``, ``x.dim()``), or None when ``n`` is not shape arithmetic. Reshapes take
    their target from the recorded output shape with a dynamic batch axis, so ``x.view(x.size(0), -1)``
    stays batch-agnostic; a batch size used otherwise (``torch.zeros(x.size(0), ...)``) is the recorded one."""
    args = n.args
    if n.op == "call_method" and n.target in ("size", "dim") and args and isinstance(args[0], fx.Node):
        shape = shape_of(args[0])
        if shape is None:
            return None
        if n.target == "dim":
            return len(shape)
        dim = n.kwargs.get("dim", args[1] if len(args) > 1 else None)
        return torch.Size(shape) if dim is None else shape[dim]
    if n.op == "call_function" and n.target is getattr and len(args) == 2 and args[1] == "device":
        return torch.device("cpu")  # where a factory op puts its result: nothing in an ONNX graph
    if n.op == "call_function" and n.target is getattr and len(args) == 2 and args[1] == "dtype":
        return getattr(patterns.recorded_meta(args[0]), "dtype", None)  # x.to(y.dtype): the recorded type
    if n.op == "call_function" and n.target is getattr and len(args) == 2 and args[1] == "shape":
        shape = shape_of(args[0])
        return torch.Size(shape) if shape is not None else None
    if n.op == "call_function" and n.target is operator.getitem and args and args[0] in folded:
        idx = args[1]
        return folded[args[0]][idx] if not isinstance(idx, fx.Node) else None
    if n.op == "call_function" and n.target in _INT_OPS and all(isinstance(a, (int, float)) or a in folded for a in args):
        vals = [folded[a] if isinstance(a, fx.Node) else a for a in args]
        return n.target(*vals)
    return None


def _container(bits: int, signed: bool, opset: int):
    """(TensorProto type, qmin, qmax) of the smallest ONNX integer type holding the grid."""
    if bits <= 4 and opset >= 21:
        return (TensorProto.INT4, -8, 7) if signed else (TensorProto.UINT4, 0, 15)
    if bits <= 8:
        return (TensorProto.INT8, -128, 127) if signed else (TensorProto.UINT8, 0, 255)
    if bits <= 16 and opset >= 21:
        return (TensorProto.INT16, -32768, 32767) if signed else (TensorProto.UINT16, 0, 65535)
    raise ExportError(f"{bits}-bit grids need opset 21 (int16/uint16) for ONNX export; pass opset=21")


class _Builder:
    def __init__(self, opset: int, unsigned_weights: bool = False, dynamic_size: bool = False):
        self.opset = opset
        self.unsigned_weights = unsigned_weights
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.names: set[str] = set()
        self.q_inputs: set[str] = set()  # values that feed a QuantizeLinear
        self.dq_inits: set[str] = set()  # initializers that feed a DequantizeLinear
        self.prunable: set[int] = set()  # ids of nodes dropped when nothing reads them (a final LSTM cell state)
        self.weights: dict[tuple, tuple[str, str]] = {}  # (encoding name, dtype): integers, zero point (shared layers)
        self.dynamic_size = dynamic_size  # height and width symbolic: shapes that follow them are read at run time
        self.values: dict = {}  # fx node -> its ONNX value (a name, a _Quantized, a folded Python value)

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        return name

    def const(self, base: str, arr: np.ndarray) -> str:
        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def int_const(self, name: str, values: np.ndarray, dtype: int) -> str:
        """An integer initializer stored in its own width (raw bytes; 4-bit values packed two per byte)."""
        if name in self.names:
            raise ExportError(f"duplicate tensor name {name!r}")
        self.names.add(name)
        values = np.asarray(values).astype(np.int64)
        if dtype in (TensorProto.INT4, TensorProto.UINT4):
            flat = (values.flatten() & 0xF).astype(np.uint8)
            if flat.size % 2:
                flat = np.append(flat, np.uint8(0))
            packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)  # first element in the low nibble
            self.inits.append(helper.make_tensor(name, dtype, list(values.shape), packed.tobytes(), raw=True))
        else:
            np_type = helper.tensor_dtype_to_np_dtype(dtype)
            self.inits.append(numpy_helper.from_array(values.astype(np_type), name))
        return name

    def node(self, op: str, inputs: list[str], out: Optional[str] = None, base: str = "", **attrs) -> str:
        out = out if out is not None else self.fresh(f"{base or op}_out")
        if out not in self.names:
            self.names.add(out)
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.fresh(f"{base or out}/{op}"), **attrs))
        return out


def _qparams_np(q: Quantizer):
    return q.scale.detach().cpu().float().numpy(), q.zero_point.detach().cpu().numpy()


def _axis_attrs(q: Quantizer, ndim: int) -> dict:
    g = q.spec.granularity
    if isinstance(g, PerTensor):
        return {}
    axis = g.axis if g.axis >= 0 else g.axis + ndim
    if isinstance(g, PerChannel):
        return {"axis": axis}
    return {"axis": axis, "block_size": g.block_size}


def _scale_shape(q: Quantizer, arr: np.ndarray) -> np.ndarray:
    """ONNX wants a scalar (per-tensor), 1-D (per-axis) or input-rank (blocked) scale."""
    g = q.spec.granularity
    if isinstance(g, PerTensor):
        return arr.reshape(())
    if isinstance(g, PerChannel):
        return arr.reshape(-1)
    return arr


def _act_storage(q: Quantizer, opset: int) -> tuple[int, int, int, int]:
    """``(container dtype, cmin, cmax, offset)`` of activation grid ``q``: the stored code is the grid code plus
    ``offset``."""
    offset = storage_offset(q.spec.bits, q.spec.signed)
    if q.spec.bits <= 8:  # stored as uint8 (a signed grid shifted by the offset): ORT fuses uint8 activations everywhere
        return TensorProto.UINT8, 0, 255, offset
    return (*_container(q.spec.bits, q.spec.signed, opset), offset)


def _grid_consts(b: _Builder, q: Quantizer) -> tuple[str, str]:
    """The scale and stored zero point initializers of per-tensor activation grid ``q``."""
    if not isinstance(q.spec.granularity, PerTensor):
        raise ExportError(f"activation quantizer {q.tensor_name!r} is {type(q.spec.granularity).__name__}: "
                          "ONNX export supports per-tensor activations (the integer kernels need them)")
    scale, zp = _qparams_np(q)
    dtype, _, _, offset = _act_storage(q, b.opset)
    s = b.const(f"{q.tensor_name}_scale", _scale_shape(q, scale).astype(np.float32))
    z = b.fresh(f"{q.tensor_name}_zero_point")
    b.names.discard(z)
    b.int_const(z, _scale_shape(q, zp.astype(np.int64) + offset), dtype)
    return s, z


def _activation_qdq(b: _Builder, q: Quantizer, x: str, ndim: int) -> "_Quantized":
    s, z = _grid_consts(b, q)
    _, cmin, cmax, offset = _act_storage(q, b.opset)
    src = x
    if (q.qmin + offset, q.qmax + offset) != (cmin, cmax):  # the grid is narrower than the container: clip in float first
        lo, hi = (float(v.reshape(-1)[0]) for v in grid_range(q.scale.detach().cpu(), q.zero_point.cpu(), q.qmin, q.qmax))
        src = b.node("Clip", [x, b.const(f"{q.tensor_name}_lo", np.float32(lo)), b.const(f"{q.tensor_name}_hi", np.float32(hi))],
                     base=f"{q.tensor_name}_clip")
    b.q_inputs.add(x)
    qo = b.node("QuantizeLinear", [src, s, z], out=b.fresh(f"{q.tensor_name}_quantized"), base=q.tensor_name)
    return _Quantized(qo, s, z, q.tensor_name)


def _lookup(b: _Builder, q_node: fx.Node, modules, src: "_Quantized") -> Optional["_Quantized"]:
    """The elementwise op that quantizer node ``q_node`` reads, as a ``Gather`` from ``src``'s stored codes into
    the op's table (:func:`~edgequant.graph.lowering.table_lowering`): its output is ``q_node``'s stored codes,
    named after its encoding. None when the op has no table (NaN on some code)."""
    found = lowering.lookup_table(q_node, modules)
    if found is None:
        return None
    t, _, q_in = found
    t, q = t.cpu().numpy(), modules[q_node.target]
    _, cmin, cmax, offset = _act_storage(q_in, b.opset)
    codes = np.clip(np.arange(cmin, cmax + 1) - offset, q_in.qmin, q_in.qmax) - q_in.qmin  # container code -> table row
    s, z = _grid_consts(b, q)
    dtype, _, _, out_offset = _act_storage(q, b.opset)
    table = b.fresh(f"{q.tensor_name}_table")
    b.names.discard(table)
    b.int_const(table, t[codes] + out_offset, dtype)
    idx = b.node("Cast", [src.q], base=q.tensor_name, to=TensorProto.INT32)
    if cmin != 0:
        idx = b.node("Sub", [idx, b.const(f"{q.tensor_name}_cmin", np.int32(cmin))], base=q.tensor_name)
    return _Looked(b.node("Gather", [table, idx], out=b.fresh(q.tensor_name), base=q.tensor_name, axis=0), s, z, q.tensor_name)


class _Quantized:
    """A quantized value; every consumer gets its own DequantizeLinear, as ONNX Runtime's QDQ fusion
    needs (a DQ shared by a conv and an add keeps both in float)."""

    def __init__(self, q: str, scale: str, zero_point: str, name: str):
        self.q, self.scale, self.zero_point, self.name = q, scale, zero_point, name

    def dequantized(self, b: "_Builder") -> str:
        out = b.node("DequantizeLinear", [self.q, self.scale, self.zero_point], out=b.fresh(f"{self.name}_dequantized"),
                     base=self.name)
        b.prunable.add(id(b.nodes[-1]))  # dropped if no node reads it (an op resolved, then exported another way)
        return out


class _Looked(_Quantized):
    """A quantizer's codes computed by a table lookup (:func:`_lookup`): the quantizer node passes them on."""


def _weight_storage(b: _Builder, q: Quantizer, dtype: Optional[int] = None) -> tuple[int, int]:
    """``(stored dtype, shift added to the integers and the zero point)`` of weight grid ``q`` in ``dtype`` (default:
    the smallest container of the grid): 8-bit signed weights move to uint8 + 128 when the builder stores unsigned
    weights (the same dequantized values)."""
    dtype = dtype if dtype is not None else _container(q.spec.bits, q.spec.signed, b.opset)[0]
    return (TensorProto.UINT8, 128) if b.unsigned_weights and dtype == TensorProto.INT8 else (dtype, 0)


def _weight_integers(b: _Builder, q: Quantizer, w: torch.Tensor, dtype: Optional[int] = None) -> tuple[str, str]:
    """The integer initializer of weight ``w`` (named as its encoding) and of its zero point, stored as
    :func:`_weight_storage` says."""
    dtype, shift = _weight_storage(b, q, dtype)
    key = (q.tensor_name, dtype)
    if key in b.weights:  # a layer called more than once: its integers are written once
        return b.weights[key]
    wi = quantize(w.detach(), q.scale, q.zero_point, q.qmin, q.qmax, q.spec.granularity).cpu().numpy().astype(np.int64) + shift
    zp = _qparams_np(q)[1].astype(np.int64) + shift
    name = b.int_const(q.tensor_name, wi, dtype)
    zname = b.fresh(f"{q.tensor_name}_zero_point")
    b.names.discard(zname)
    b.int_const(zname, _scale_shape(q, zp), dtype)
    b.weights[key] = name, zname
    return name, zname


def _weight_dq(b: _Builder, q: Quantizer, w: torch.Tensor) -> str:
    if isinstance(q.spec.granularity, PerBlock) and b.opset < 21:
        raise ExportError(f"{q.tensor_name}: blocked quantization needs opset 21")
    name, zname = _weight_integers(b, q, w)
    b.dq_inits.add(name)
    s = b.const(f"{q.tensor_name}_scale", _scale_shape(q, _qparams_np(q)[0]).astype(np.float32))
    return b.node("DequantizeLinear", [name, s, zname], out=b.fresh(f"{q.tensor_name}_dequantized"),
                  base=q.tensor_name, **_axis_attrs(q, w.ndim))


def _bias_grid(m: nn.Module, s_in, q: Quantizer) -> tuple[np.ndarray, np.ndarray]:
    """``(int32 bias integers, float64 bias scale)`` of layer ``m`` on the accumulator grid ``s_in * s_w``."""
    s_b = bias_scale(s_in, q.scale, m.bias.shape[0]).cpu()
    return bias_integers(m.bias.detach().cpu(), s_b).numpy().astype(np.int32), s_b.numpy()


def _weight_quantizer(m: nn.Module) -> Optional[Quantizer]:
    pq = getattr(m, "param_quantizers", None)
    q = pq["weight"] if pq is not None and "weight" in pq else None
    return q if isinstance(q, Quantizer) else None


def _input_scale(node: fx.Node, modules) -> Optional[float]:
    """Scale of the per-tensor activation quantizer that feeds ``node`` (through pass-through ops)."""
    q = lowering.source_quantizer(node.args[0], modules) if node.args else None
    return q.scalar_grid()[0] if q is not None and isinstance(q.spec.granularity, PerTensor) else None


def _gathers_rows(q: Optional[Quantizer]) -> bool:
    """Whether an embedding's weight grid lets its rows be gathered as integers, then dequantized."""
    g = q.spec.granularity if q is not None else None
    return q is not None and q.spec.bits <= 8 and (isinstance(g, PerTensor) or isinstance(g, PerChannel) and g.axis == 0)


def _embedding_rows(b: _Builder, q: Quantizer, m: nn.Embedding, ids: str, out: str, name: str) -> str:
    """An 8-bit embedding as Gather on its integer table, then the rows dequantized by DequantizeLinear's
    arithmetic, ``(float(q) - z) * s`` with each row's own ``s`` and ``z`` gathered alike (Cast, Sub, Mul;
    the same float32 values): a DequantizeLinear of the whole table ran on every inference (MiniLM's
    30522 x 384 table: about half of its batch-1 time)."""
    wi, _ = _weight_integers(b, q, m.weight)
    scale, zp = _qparams_np(q)
    zp = zp.astype(np.float32) + _weight_storage(b, q)[1]
    y = b.node("Cast", [b.node("Gather", [wi, ids], base=f"{name}.rows")], base=f"{name}.rows_float", to=TensorProto.FLOAT)
    if np.any(zp != 0):
        z = b.const(f"{name}.row_zero_point", zp.reshape(-1, 1))
        y = b.node("Sub", [y, z if zp.size == 1 else b.node("Gather", [z, ids], base=f"{name}.row_zero_points")],
                   base=f"{name}.rows_centered")
    sname = b.const(f"{name}.row_scale", scale.astype(np.float32).reshape(-1, 1))
    return b.node("Mul", [y, sname if scale.size == 1 else b.node("Gather", [sname, ids], base=f"{name}.row_scales")],
                  out=out, base=name)


def _weighted(b: _Builder, node: fx.Node, m: nn.Module, x: str, out: str, modules, meta_ndim: int) -> str:
    q = _weight_quantizer(m)
    name = node.target
    if isinstance(m, nn.Embedding) and _gathers_rows(q):
        return _embedding_rows(b, q, m, x, out, name)
    if q is not None:
        w = _weight_dq(b, q, m.weight)
    else:
        w = b.const(f"{name}.weight", m.weight.detach().cpu().numpy())
    inputs = [x, w]
    if getattr(m, "bias", None) is not None:  # an Embedding has none
        s_in = _input_scale(node, modules)
        if q is not None and s_in is not None and not isinstance(q.spec.granularity, PerBlock):
            bq, s_b = _bias_grid(m, s_in, q)
            bname = b.fresh(f"{name}.bias")  # a layer called twice writes its bias once per input grid
            b.names.discard(bname)
            b.int_const(bname, bq, TensorProto.INT32)
            b.dq_inits.add(bname)
            sb = b.const(f"{name}.bias_scale", s_b.astype(np.float32))
            zb = b.const(f"{name}.bias_zero_point", np.zeros_like(bq))
            inputs.append(b.node("DequantizeLinear", [bname, sb, zb], out=b.fresh(f"{name}.bias_dequantized"), axis=0))
        else:
            inputs.append(b.const(f"{name}.bias", m.bias.detach().cpu().numpy()))
    if isinstance(m, nn.Linear):
        if meta_ndim == 2:
            return b.node("Gemm", inputs, out=out, base=name, transB=1)
        wt = b.node("Transpose", [w], base=f"{name}.weight_t", perm=[1, 0])
        y = b.node("MatMul", [x, wt], out=out if m.bias is None else None, base=name)
        return y if m.bias is None else b.node("Add", [y, inputs[2]], out=out, base=name)
    if isinstance(m, nn.Embedding):
        return b.node("Gather", [w, x], out=out, base=name)
    k = list(m.kernel_size)
    begins, ends = zip(*conv_pads(m))
    pads = list(begins + ends)  # ONNX: every begin, then every end
    if m.padding_mode != "zeros":
        raise ExportError(f"{name}: padding_mode={m.padding_mode!r} has no ONNX Conv equivalent")
    attrs = dict(kernel_shape=k, strides=list(m.stride), pads=pads, dilations=list(m.dilation), group=m.groups)
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        attrs["output_padding"] = list(m.output_padding)
        return b.node("ConvTranspose", inputs, out=out, base=name, **attrs)
    return b.node("Conv", inputs, out=out, base=name, **attrs)


class _BakedBatch(ExportError):
    """The graph builds a tensor from its batch size, so a dynamic-batch export would bake it."""


def export_onnx(sim, path, *, opset: Optional[int] = None, weight_dtype: str = "auto",
                dynamic_batch: Optional[bool] = None, encodings_path=None, example_inputs=None,
                tables: bool = False, float64: bool = False, dynamic_size: Optional[bool] = False) -> dict:
    """Write ``sim`` as an ONNX QDQ model to ``path`` and its encodings beside it (atomically).

    Args:
        opset: defaults to 21 when a grid needs it (4 or 16 bits, blocked weights), else 17; raised to the
            opset that defines a float op of the graph when 17 does not (``F.fold`` is Col2Im, opset 18).
        weight_dtype: container of signed weights of 5 to 8 bits. ``"uint8"`` stores ``q + 128`` with
            zero point ``128`` -- the same dequantized values -- so ONNX Runtime picks its u8u8
            kernels. With ``"int8"`` it picks u8s8 kernels, which on x86 CPUs without VNNI add pairs
            of products in saturating int16 (``vpmaddubsw``): with full 8-bit weights, outputs then
            differed from the sim by up to 19 quantization steps on a small CNN (82 on MobileNetV2).
            Weights of at most 7 bits (preset ``w7a8``) cannot saturate and run exactly, and faster.
            ``"auto"`` (default): ``"int8"`` when every such weight grid has at most 7 bits, else
            ``"uint8"``. Use ``"int8"`` for VNNI/ARM targets or other runtimes.
        dynamic_batch: make the first input/output dimension symbolic. Other dimensions keep the
            shapes recorded on the sim's example inputs. A model that builds tensors from its batch size
            (a transformer's attention mask, a padding or class token sized by the batch) cannot keep it
            symbolic: ``True`` then raises, ``False`` always writes the recorded batch size, and ``None``
            (default) makes it symbolic where the graph allows and otherwise writes the recorded batch size
            with a warning (export once per batch size, ``example_inputs=`` sets it).
        dynamic_size: make the height and width (the dimensions after the channels of float inputs of 3 to 5
            dimensions, and the output dimensions that follow them) symbolic: one file for images of any size.
            Checked, not assumed (:mod:`edgequant.export.dynamic`): the graph is built again on inputs 32 larger
            and must come out the same; a graph that computes a shape, pool or size from its input size is refused
            by the first node that differs. ``True`` raises then, ``None`` writes the example's size with a
            warning, ``False`` (default) always writes the example's size.
        example_inputs: inputs whose shapes the exported graph takes (a tensor, a tuple or a dict, as for
            ``QuantSim``) in place of the sim's own example inputs: another batch size or sequence length.
        tables: write each elementwise op between two per-tensor grids (GELU, SiLU, hard-swish, sigmoid, tanh,
            ...; :func:`~edgequant.graph.lowering.table_lowering`) as a ``Gather`` from its input's codes into
            its table of output codes (:mod:`edgequant.core.lut`): an integer-only graph, bit-identical to
            ``sim.integer_exact(tables=True)`` and the integer engine on any runtime. Off by default: ONNX
            Runtime runs a ``Gather`` about 2.4x slower than ``DequantizeLinear -> HardSwish ->
            QuantizeLinear`` and 30x slower than its ``QLinearSigmoid``, so the default keeps these ops in float
            between DequantizeLinear and QuantizeLinear (as ``quantize_static`` does), where ORT's float kernels
            may round a value differently from torch's in the last bit.
        float64: write LayerNorm, GroupNorm and softmax as their computation in float64 rounded to float32 once
            (``Cast`` to double, ``ReduceMean``, ``Sub``, ``Mul``, ``Sqrt``, ``Div``, ``Softmax``, ``Cast`` back;
            :mod:`edgequant.core.float64`), as ``sim.integer_exact(float64=True)`` computes them: the final float32
            rounding hides the last-bit differences between ORT's float32 kernels and torch's, so transformers
            become bit-identical with the sim. Off by default: a float64 LayerNorm costs ORT ~8x its float32 kernel.

    Returns ``{"onnx": path, "encodings": encodings_path, "opset": opset, "weight_dtype": weight_dtype,
    "dynamic_size": whether the height and width came out symbolic}``. A
    :class:`~edgequant.sim.RegionSim` is written region by region into the folder ``path``
    (:func:`edgequant.export.regions.export_regions`).
    """
    if weight_dtype not in ("auto", "uint8", "int8"):
        raise ValueError(f"weight_dtype must be 'auto', 'uint8' or 'int8', got {weight_dtype!r}")
    from ..sim.quantsim import QuantSim
    from ..sim.regions import RegionSim

    if isinstance(sim, RegionSim):
        from .regions import export_regions

        return export_regions(sim, path, opset=opset, weight_dtype=weight_dtype, dynamic_batch=dynamic_batch,
                              tables=tables, float64=float64, dynamic_size=dynamic_size)
    if not isinstance(sim, QuantSim):
        raise TypeError(f"export_onnx needs a QuantSim or a RegionSim, got {type(sim).__name__}")
    if sim.capture_mode != "graph":
        raise ExportError("ONNX export needs a sim built by graph capture; this one fell back to leaf modules "
                          "(see the capture warning for the line that stopped tracing)")
    auto_opset = opset is None
    opset, weight_dtype = _formats(_exportable_quantizers(sim), opset, weight_dtype)
    path, encodings_path = _output_paths(path, encodings_path)

    build = _builder(sim, example_inputs, weight_dtype == "uint8", tables, float64, dynamic_size)
    model, opset = _build_at_opset(build, opset, auto_opset, dynamic_batch)
    onnx.checker.check_model(model)
    _check_names(model, sim)
    acts, params = sim.encodings()
    import json

    text = json.dumps(to_edgequant(acts, params), indent=1)
    # the ONNX file and its encodings are replaced together or not at all
    write_files_together({path: lambda tmp: onnx.save(model, tmp), encodings_path: lambda tmp: Path(tmp).write_text(text)})
    return {"onnx": path, "encodings": encodings_path, "opset": opset, "weight_dtype": weight_dtype,
            "dynamic_size": has_symbolic_size(model)}


def _builder(sim, example_inputs, unsigned_weights: bool, tables: bool, float64: bool, dynamic_size: Optional[bool]):
    """``build(opset, dynamic_batch) -> ModelProto`` for :func:`export_onnx`'s options."""
    def build(op: int, dyn: bool) -> onnx.ModelProto:
        def on(example, sized=False):
            return _build_on(sim, example, op, dyn, unsigned_weights, tables, float64, sized)
        if dynamic_size is not False:
            return _sized(on, sim._example_inputs if example_inputs is None else example_inputs, dynamic_size)
        if example_inputs is not None:
            return on(example_inputs)
        return _build(sim, op, dyn, unsigned_weights, tables, float64)
    return build


def _sized(build, example_inputs, dynamic_size: Optional[bool]) -> onnx.ModelProto:
    """``build(example_inputs, sized)`` with symbolic height and width (:func:`edgequant.export.dynamic.with_dynamic_size`);
    with ``dynamic_size=None``, where the graph allows, else at the example's size with a warning."""
    return _or_static(lambda: with_dynamic_size(lambda example: build(example, True), example_inputs),
                      lambda: build(example_inputs), dynamic_size, SizeDependent,
                      "the export keeps the example's height and width")


def _formats(qs: dict, opset: Optional[int], weight_dtype: str) -> tuple[int, str]:
    """``(opset, weight container)`` of an export of quantizers ``qs``: opset 21 where a grid needs it (4 or 16 bits,
    blocked weights), else 17; ``"auto"`` weights are ``int8`` when no 8-bit weight grid could saturate u8s8 kernels."""
    needs21 = any(q.spec.bits in (4, 16) or q.spec.bits > 8 or isinstance(q.spec.granularity, PerBlock)
                  for q in qs.values())
    opset = opset or (21 if needs21 else 17)
    if opset < 13:
        raise ExportError("opset must be >= 13 (per-axis QuantizeLinear/DequantizeLinear)")
    if weight_dtype == "auto":
        wide = [q for q in qs.values() if q.role == "weight" and q.spec.signed and q.qmin < -64 and q.spec.bits <= 8]
        weight_dtype = "uint8" if wide else "int8"
    return opset, weight_dtype


def _exportable_quantizers(sim) -> dict:
    """``sim.quantizers()``, checked: every one calibrated, no batch norm still simulated."""
    simulated = [n for n, m in sim.model.named_modules() if getattr(m, "simulates_bn", False)]
    if simulated:
        raise ExportError(f"{len(simulated)} layer(s) still simulate their batch norm ({', '.join(simulated[:3])}): call "
                          "edgequant.qat.fold_simulated_bn(sim) after training, then export")
    qs = sim.quantizers()
    missing = [n for n, q in qs.items() if not q.is_initialized]
    if missing:
        raise NotCalibratedError(f"{len(missing)} quantizer(s) have no encoding ({', '.join(missing[:5])}): "
                                 "call sim.calibrate(data) or sim.load_encodings(path) before export_onnx")
    return qs


def _output_paths(path, encodings_path) -> tuple[str, str]:
    """The ONNX and encodings paths, checked writable (an existing folder holds each; neither is a folder)."""
    path = os.fspath(path)
    encodings_path = os.fspath(encodings_path) if encodings_path else os.path.splitext(path)[0] + ".encodings.json"
    for p in (path, encodings_path):
        parent = os.path.dirname(os.path.abspath(p))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"cannot write {p}: folder {parent} does not exist")
        if os.path.isdir(p):
            raise IsADirectoryError(f"cannot write {p}: it is a folder; give a file name such as {os.path.join(p, 'model.onnx')}")
    return path, encodings_path


def _build_at_opset(build, opset: int, auto_opset: bool, dynamic_batch: Optional[bool]) -> tuple[onnx.ModelProto, int]:
    """``(model, opset)``: ``build(opset, dynamic)``; with the opset left to the export (``auto_opset``), a float op
    that only a later opset defines (``F.fold``: Col2Im, 18) raises it to the one torch.onnx names."""
    try:
        return _with_batch(lambda dyn: build(opset, dyn), dynamic_batch), opset
    except generic_export.NeedsOpset as e:
        need = e.opset
        if not (auto_opset and opset < need <= 21):
            raise
    return _with_batch(lambda dyn: build(need, dyn), dynamic_batch), need


def _with_batch(build, dynamic_batch: Optional[bool]) -> onnx.ModelProto:
    """``build(dynamic)``, falling back to the recorded batch size (with a warning) when ``dynamic_batch`` is None and
    the graph builds tensors from its batch size."""
    if dynamic_batch is False:
        return build(False)
    return _or_static(lambda: build(True), lambda: build(False), dynamic_batch, _BakedBatch,
                      "the export keeps the batch size of the example inputs. Export once per batch size "
                      "(example_inputs=) or pass dynamic_batch=False to silence this")


def _or_static(symbolic, static, strict: Optional[bool], error: type, note: str) -> onnx.ModelProto:
    """``symbolic()``; where it raises ``error``, ``static()`` with a warning (the error's first clause, then ``note``),
    or the error itself when ``strict`` (the option was ``True``, not ``None``)."""
    try:
        return symbolic()
    except error as e:
        if strict:
            raise
        import warnings

        warnings.warn(f"{e.args[0].split(': export with')[0][:240]}; {note}", stacklevel=5)
        return static()


def _build_on(sim, example_inputs, opset: int, dynamic_batch: bool, unsigned_weights: bool,
              tables: bool = False, float64: bool = False, dynamic_size: bool = False) -> onnx.ModelProto:
    """``_build`` with the shapes of ``example_inputs`` recorded on the graph for the time of the export."""
    from ..sim.prepare import propagate_shapes

    args, kwargs = as_args(example_inputs)
    nodes = list(sim.model.graph.nodes)
    saved = [n.meta.get("tensor_meta") for n in nodes]
    try:
        with torch.no_grad():
            propagate_shapes(sim.model, args, kwargs)
        return _build(sim, opset, dynamic_batch, unsigned_weights, tables, float64, dynamic_size)
    finally:
        for n, meta in zip(nodes, saved):
            n.meta["tensor_meta"] = meta


def _check_names(model: onnx.ModelProto, sim) -> None:
    """Every encoding names exactly one ONNX tensor: activations feed a QuantizeLinear, weights are the
    integer initializers a DequantizeLinear (or a MatMulInteger, through its Transpose, or an embedding's
    row Gather) reads."""
    q_in = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    clip_src = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Clip"}
    q_in |= {clip_src[v] for v in list(q_in) if v in clip_src}
    dq_in = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    w_in = dq_in | {n.input[0] for n in model.graph.node if n.op_type in ("Transpose", "Gather")}  # MatMulInteger's, tables
    inits = {i.name for i in model.graph.initializer}
    # an elementwise op run as a table lookup: its output codes carry the name
    looked_up = {n.output[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits}
    # a recurrent layer's tensors: the first time step's value carries the name (a table lookup's output
    # for the gate activations, which no QuantizeLinear computes)
    values = {o for n in model.graph.node for o in n.output}
    recurrent = {q.tensor_name for m in sim.model.modules() if isinstance(m, QuantizedRecurrentMixin)
                 for q in m.tensor_quantizers.values() if isinstance(q, Quantizer)}
    computed = folded_quantizers(sim.model)  # inside subgraphs computed at export (export/constants.py)
    bad = []
    for name, q in sim.quantizers().items():
        if name in computed and name not in values and name not in inits:
            continue
        if name in recurrent:
            if name not in values:
                bad.append(f"recurrent tensor {name!r} is no value of the graph")
            continue
        if not q.is_weight and name not in q_in and name not in looked_up:
            bad.append(f"activation {name!r} is not the input of a QuantizeLinear")
        if q.role == "weight" and not (name in inits and name in w_in):
            bad.append(f"weight {name!r} is not an initializer read by a DequantizeLinear")
    if bad:
        raise ExportError("encodings do not match the ONNX graph one-to-one: " + "; ".join(bad[:5]))


def _shape_of(n: fx.Node) -> Optional[list]:
    """The shape shape propagation recorded for node ``n``, or None."""
    meta = patterns.recorded_meta(n)
    return list(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _build(sim, opset: int, dynamic_batch: bool, unsigned_weights: bool, tables: bool = False,
           float64: bool = False, dynamic_size: bool = False) -> onnx.ModelProto:
    gm = sim.model
    modules = dict(gm.named_modules())
    b = _Builder(opset, unsigned_weights, dynamic_size)
    val: dict[fx.Node, str] = b.values
    # subgraphs on parameters and buffers with layers or quantizers in them, computed by the sim (export/constants.py)
    constants = constant_values(sim, tables, float64)
    # values that a quantizer reads carry the quantizer's tensor name
    want = {n.args[0]: m.tensor_name for n in gm.graph.nodes if isinstance(m := patterns.module_of(n, modules), Quantizer)}
    reserved = set(want.values())  # a quantizer named "add" (a top-level add) vs an unquantized fx node named "add"
    int_clamps = _integer_clamps(gm, modules, want)
    # with tables=True, elementwise ops between per-tensor grids: a table lookup replaces the op and its quantizer
    tables = {n.args[0]: n for n in gm.graph.nodes if tables and lowering.table_lowering(n, modules) is not None}
    inputs, outputs = [], []
    shape_of = _shape_of
    vinfo = lambda name, n: _value_info(name, n, shape_of(n), dynamic_batch)  # noqa: E731

    folded: dict[fx.Node, object] = {}  # shape arithmetic, folded to Python values
    batch: set[fx.Node] = set()  # the folded values that hold the recorded batch size
    flat: dict[fx.Node, tuple] = {}  # linear layers run on 2-D integers whose quantizer reshapes back: (N-D shape, input)

    def generic(n, m, out):
        # with symbolic sizes, a size read from a tensor's shape (F.interpolate(x, size=y.shape[-2:])) is read at run time
        replayed = generic_export.shape_reads(n, folded) if dynamic_size else {}
        ins = [_resolve(b, val[x]) for x in generic_export.tensor_nodes(n, folded) + generic_export.shape_sources(replayed)]
        with Float64Norms() if float64 else contextlib.nullcontext():  # traced in float64, as integer_exact computes
            return generic_export.export_one(b, n, m, ins, out, dynamic_batch, folded, replayed, dynamic_size)

    for n in gm.graph.nodes:
        out = want.get(n) or (n.name if n.name not in reserved else b.fresh(f"{n.name}_value"))
        m = patterns.module_of(n, modules)
        if n in constants and _fold_constant(b, n, m, constants, val, folded, flat, shape_of):
            continue
        if _shape_or_selection(b, n, val, folded, want, shape_of, batch):
            continue
        if dynamic_batch and n.op == "call_method" and n.target == "expand" and any(a in batch for a in n.args[1:]):
            val[n] = _expand_to_batch(b, n, val, batch, shape_of, out)
            continue
        if dynamic_batch:
            _refuse_baked_batch(n, folded, batch)
        src = val.get(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
        if _passes_on(b, n, m, src, val, (want, int_clamps, tables), modules):
            continue
        if isinstance(src, _Quantized) and _move(b, n, m, src, val, want, modules, shape_of):
            continue
        if isinstance(m, QuantizedRecurrentMixin):
            val[n] = _recurrent(b, n, m, src, shape_of(n.args[0]), val)
            continue
        if isinstance(src, _Quantized) and lowering.linear_on_tokens(n, m):
            val[n] = _linear_nd(b, n, m, src, out, modules, shape_of, flat)
            continue
        if n.op == "output":  # before the arguments are resolved: one DequantizeLinear per output
            _add_outputs(b, n, val, inputs, outputs, vinfo)
            continue
        a = list(fx.node.map_aggregate(n.args, lambda x: _resolve(b, val[x]) if isinstance(x, fx.Node) else x))
        if n.op == "placeholder":
            b.names.add(out)
            inputs.append(vinfo(out, n))
            val[n] = out
        elif isinstance(m, Quantizer):
            val[n] = _quantized(b, n, m, a[0], flat, shape_of)
            if n in int_clamps:
                _clamp_integers(b, val[n], m, int_clamps[n], modules, len(shape_of(n)))
        elif float64 and lowering.float64_op(n, modules):
            val[n] = generic(n, m, out)
        elif m is not None or n.op in ("call_function", "call_method"):
            try:
                val[n] = _module(b, n, m, a, out, modules, shape_of) if m is not None else _function(b, n, a, out, shape_of)
            except _NoMapping:
                val[n] = generic(n, m, out)
        elif n.op == "get_attr":
            t = operator.attrgetter(n.target)(gm)
            # not under the parameter's own name, which its weight encoding's integers take
            val[n] = b.const(f"{n.target}_value", t.detach().cpu().numpy())
        else:
            raise ExportError(f"cannot export fx node {n.op} {n.target}")
        if n in want and val.get(n) != want[n] and n.op != "placeholder":
            val[n] = b.node("Identity", [_resolve(b, val[n])], out=want[n])
    return _model(b, inputs, outputs, opset)


def _model(b: _Builder, inputs: list, outputs: list, opset: int) -> onnx.ModelProto:
    """The ONNX model of what builder ``b`` holds, its dead nodes pruned."""
    _prune(b, {o.name for o in outputs})
    graph = helper.make_graph(b.nodes, "edgequant", inputs, outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgequant")
    model.ir_version = min(model.ir_version, 10)
    return model


def _fold_constant(b: _Builder, n: fx.Node, m, constants: dict, val: dict, folded: dict, flat: dict, shape_of) -> bool:
    """Write node ``n`` of a constant subgraph (:mod:`edgequant.export.constants`) as the value the sim computed: nothing
    where only other constant nodes read it, an initializer where the rest of the graph does, and for a quantizer there
    its QuantizeLinear / DequantizeLinear on that initializer (ORT's integer kernels read it; it carries the name).
    False for a non-tensor value that the rest of the graph reads (exported as usual)."""
    v = constants[n]
    outside = [u for u in n.users if u not in constants]
    if not isinstance(v, torch.Tensor):
        return not outside
    folded[n] = v
    val[n] = b.const(f"{n.name}_folded", v.cpu().numpy())
    if isinstance(m, Quantizer) and outside:
        x = b.node("Identity", [val[n]], out=m.tensor_name)
        val[n] = _quantized(b, n, m, x, flat, shape_of)
    return True


def _passes_on(b: _Builder, n: fx.Node, m, src, val: dict, lowered: tuple, modules) -> bool:
    """Set ``val[n]`` and return True where node ``n`` passes its input's integers on, or a table lookup computes
    them (``lowered``: the quantizer names wanted, the integer clamps, the table lookups of :func:`_build`)."""
    want, int_clamps, tables = lowered
    if n in int_clamps.values():  # a handful of clamps: no index needed
        val[n] = val[n.args[0]]  # clamped on the integers after its quantizer
    elif isinstance(src, _Quantized) and n in tables and (looked := _lookup(b, tables[n], modules, src)) is not None:
        val[n] = looked  # the quantizer node that reads it passes it on
    elif isinstance(m, Quantizer) and isinstance(src, _Looked):
        val[n] = src
    elif isinstance(src, _Quantized) and ops.is_identity(n, modules) and n not in want:
        val[n] = src  # contiguous(), dropout: the integers pass on, still quantized
    else:
        return False
    return True


def _integer_clamps(gm: fx.GraphModule, modules: dict, want: dict) -> dict:
    """``{quantizer node: ChannelClamp node}`` for each per-channel clamp (CLE or activation equalization through
    ReLU6) read only by an 8-bit per-tensor quantizer and reading a value nothing else reads. Exported as the
    quantizer's QuantizeLinear, then ``Max``/``Min`` on its uint8 integers at the clamp's bounds on the grid (the same
    integers, since rounding is monotonic): a float ``Max``/``Min`` between the layer and its QuantizeLinear kept
    ONNX Runtime from fusing the layer into its integer kernel, so the layer ran in float32 (slower, and off the
    integer-exact sim by a step at near-ties). The clamp's input takes the quantizer's tensor name."""
    found = {}
    for n in gm.graph.nodes:
        m, u = patterns.module_of(n, modules), patterns.only_user(n)
        q = patterns.module_of(u, modules) if u is not None else None
        src = n.args[0] if n.args else None
        if not (isinstance(m, ChannelClamp) and isinstance(q, Quantizer) and isinstance(q.spec.granularity, PerTensor)
                and q.spec.bits <= 8 and isinstance(src, fx.Node) and len(src.users) == 1 and src not in want
                and src.op != "placeholder" and (meta := patterns.recorded_meta(n)) is not None
                and (m.channel_axis == 1 or len(meta.shape) == 2)):
            continue
        found[u] = n
        want[src] = want.pop(n)
    return found


def _clamp_integers(b: _Builder, qv: "_Quantized", q: Quantizer, clamp: fx.Node, modules, ndim: int) -> None:
    """Clamp the stored (uint8) integers of ``qv`` per channel at the bounds of ChannelClamp node ``clamp``. A side
    whose bounds all lie at or beyond the grid's end is left to the QuantizeLinear's saturation: after activation
    equalization almost every bound does (on MobileNetV2 one channel of 17 equalized tensors is clamped inside the
    grid), and elementwise ops on uint8 cost ONNX Runtime more than they seem (17 Max/Min pairs on MobileNetV2: 25.0
    against 18.4 ms at batch 1, side by side in one run of ``benchmarks/bench_latency.py``)."""
    m = patterns.module_of(clamp, modules)
    lo, hi = lowering.act_bounds(clamp, modules, *q.scalar_grid(), q.qmin, q.qmax, m.lo.numel(), ndim)
    offset = storage_offset(q.spec.bits, q.spec.signed)
    for op, v, inside in (("Max", lo, bool((lo > q.qmin).any())), ("Min", hi, bool((hi < q.qmax).any()))):
        if inside:
            name = b.fresh(f"{q.tensor_name}_{'lo' if op == 'Max' else 'hi'}")
            b.names.discard(name)
            qv.q = b.node(op, [qv.q, b.int_const(name, (v + offset).numpy(), TensorProto.UINT8)], base=f"{q.tensor_name}_clamp")


def _move(b: _Builder, n: fx.Node, m, src: "_Quantized", val: dict, want: dict, modules, shape_of) -> bool:
    """Reshape the integers of ``src``, not their dequantized copy (DQ -> Flatten -> Gemm keeps ORT's Gemm in float,
    Flatten -> DQ -> Gemm -> Q fuses into its integer QGemm); False when the move has no hand-written mapping
    (the float op on the dequantized values then) or ``n`` is no move (:func:`~edgequant.graph.lowering.moves_integers`)."""
    if not lowering.moves_integers(n, modules):
        return False
    if lowering.empty_pad(n):  # its amounts may be shape arithmetic: nothing to write
        val[n] = src
        if n in want:
            val[n] = b.node("Identity", [_resolve(b, val[n])], out=want[n])
        return True
    a = [src.q] + list(fx.node.map_aggregate(n.args[1:], lambda x: _resolve(b, val[x]) if isinstance(x, fx.Node) else x))
    out = b.fresh(f"{src.name}_{n.name}")
    try:
        if m is not None:
            y = _module(b, n, m, a, out, modules, shape_of)
        elif n.target is F.pad:
            y = _pad_integers(b, n, src, out, shape_of(n.args[0]))
        else:
            y = _function(b, n, a, out, shape_of)
    except _NoMapping:
        return False
    if isinstance(y, list):  # a split: each part on the input's grid
        val[n] = [_Quantized(v, src.scale, src.zero_point, src.name) for v in y]
        return True
    val[n] = _Quantized(y, src.scale, src.zero_point, src.name)
    if n in want:
        val[n] = b.node("Identity", [_resolve(b, val[n])], out=want[n])
    return True


def _pad_integers(b: _Builder, n: fx.Node, src: "_Quantized", out: str, shape) -> str:
    """``F.pad`` on stored integers: ONNX ``Pad`` with the zero point as the constant (the real value 0), or reflecting /
    repeating the edge."""
    pad = n.kwargs.get("pad", n.args[1] if len(n.args) > 1 else None)
    onnx_mode = lowering.ONNX_PAD_MODES.get(ops.pad_mode(n))
    zp = next((i for i in b.inits if i.name == src.zero_point), None)
    if (onnx_mode is None or shape is None or not isinstance(pad, (list, tuple))
            or not all(isinstance(p, int) for p in pad) or (onnx_mode == "constant" and (zp is None or len(zp.dims)))):
        raise _NoMapping(n.name)
    begins, ends = [0] * len(shape), [0] * len(shape)
    for i in range(len(pad) // 2):  # torch: (last dim begin, last dim end, the one before, ...)
        begins[len(shape) - 1 - i], ends[len(shape) - 1 - i] = pad[2 * i], pad[2 * i + 1]
    ins = [src.q, b.const(f"{n.name}_pads", np.array(begins + ends, np.int64))]
    ins += [src.zero_point] if onnx_mode == "constant" else []
    return b.node("Pad", ins, out=out, base=n.name, mode=onnx_mode)


def _recurrent(b: _Builder, n: fx.Node, m, src, in_shape, val: dict) -> list:
    """A quantized LSTM / GRU / RNN (:mod:`edgequant.export.recurrent`); its nodes may be pruned."""
    from .recurrent import export_recurrent
    helpers = {"Quantized": _Quantized, "qdq": _activation_qdq, "container": _container, "weight_integers": _weight_integers}
    hx = n.args[1] if len(n.args) > 1 else n.kwargs.get("hx")
    hx = fx.node.map_aggregate(hx, lambda v: _resolve(b, val[v]) if isinstance(v, fx.Node) else v)
    start = len(b.nodes)
    out = export_recurrent(b, n, m, src, in_shape, helpers, hx)
    b.prunable.update(id(nd) for nd in b.nodes[start:])
    return out


def _prune(b: _Builder, graph_outputs: set) -> None:
    """Drop the builder's ``prunable`` nodes whose outputs nothing reads (an unused final LSTM cell state, a
    DequantizeLinear made for a mapping that fell back to the generic path), and the initializers only they read."""
    while True:
        used = graph_outputs | {i for nd in b.nodes for i in nd.input}
        dead = [nd for nd in b.nodes if id(nd) in b.prunable and not any(o in used for o in nd.output)]
        if not dead:
            break
        drop = {id(nd) for nd in dead}
        b.nodes = [nd for nd in b.nodes if id(nd) not in drop]
    used = {i for nd in b.nodes for i in nd.input}
    b.inits = [t for t in b.inits if t.name in used]


_BATCH_SAFE = ("view", "reshape", torch.reshape, torch.flatten, "flatten")  # take the recorded shape, batch kept dynamic


def _reads_batch(n: fx.Node, derived: set) -> bool:
    """Whether the folded value of ``n`` holds or is computed from the recorded batch size (``derived``:
    the folded nodes found so far that do)."""
    if n.op == "call_method" and n.target == "size":
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
        return dim is None or dim == 0
    if n.target is getattr:
        return n.args[1] == "shape"
    if n.target is operator.getitem and n.args[0] in derived:
        idx = n.args[1]
        return idx == 0 or (isinstance(idx, slice) and (idx.start or 0) == 0)
    return any(a in derived for a in n.all_input_nodes)


def _refuse_baked_batch(n: fx.Node, folded: dict, derived: set) -> None:
    """Raise when exporting ``n`` would write a folded batch size (``derived``) into the graph as a constant."""
    if n not in folded and n.target not in _BATCH_SAFE and any(a in derived for a in n.all_input_nodes):
        raise _BakedBatch(f"{n.name} ({ops.function_name(n.target)}) builds a tensor from the batch size, which a "
                          "dynamic-batch export cannot keep (transformer attention masks do this): export with "
                          "dynamic_batch=False, once per batch size (example_inputs= sets it)")


def _add_outputs(b: _Builder, n: fx.Node, val: dict, inputs: list, outputs: list, vinfo) -> None:
    """The graph outputs of the fx output node ``n``, each a distinct name (an Identity where needed)."""
    flat: list[tuple[str, fx.Node]] = []

    def walk(v, key):
        if isinstance(v, dict):  # segmentation models: {"out": ..., "aux": ...}, outputs named by their keys
            for k, x in v.items():
                walk(x, str(k))
        elif isinstance(v, (tuple, list)):
            for i, x in enumerate(v):
                walk(x, f"{key}_{i}" if key else f"output_{i}")
        elif isinstance(v, fx.Node):
            flat.append((key or "output_0", v))
    walk(n.args[0], "")
    for key, r in flat:
        name = _resolve(b, val[r])
        if name in {vi.name for vi in inputs} or name in (o.name for o in outputs) or isinstance(n.args[0], dict):
            name = b.node("Identity", [name], out=b.fresh(key))
        outputs.append(vinfo(name, r))


def _batch_source(f: fx.Node) -> Optional[fx.Node]:
    """The tensor whose batch size the folded value ``f`` is (``x.size(0)``, ``x.shape[0]``), or None."""
    if f.op == "call_method" and f.target == "size" and len(f.args) > 1 and f.args[1] == 0:
        return f.args[0]
    if f.target is operator.getitem and f.args[1] == 0 and isinstance(f.args[0], fx.Node):
        g = f.args[0]
        if (g.target is getattr and g.args[1] == "shape") or (g.op == "call_method" and g.target == "size" and len(g.args) == 1):
            return g.args[0]
    return None


def _expand_to_batch(b: _Builder, n: fx.Node, val: dict, batch: set, shape_of, out: str) -> str:
    """``t.expand(x.size(0), ...)`` (a class token repeated over the batch) with the batch read from ``x`` at
    run time: ``Expand(t, Concat(Shape(x)[:1], recorded dims))``."""
    sources = {_batch_source(a) for a in n.args[1:] if a in batch}
    if len(sources) != 1 or None in sources or n.args[1] not in batch:
        raise _BakedBatch(f"{n.name}: expand to a batch size computed from shapes: export with dynamic_batch=False")
    src = _resolve(b, val[sources.pop()])
    shape = shape_of(n)
    first = b.node("Shape", [src], base=f"{n.name}_batch", start=0, end=1)
    rest = b.const(f"{n.name}_dims", np.array(shape[1:], dtype=np.int64))
    target = b.node("Concat", [first, rest], base=f"{n.name}_shape", axis=0)
    return b.node("Expand", [_resolve(b, val[n.args[0]]), target], out=out, base=n.name)


def _quantized(b: _Builder, n: fx.Node, q: Quantizer, x: str, flat: dict, shape_of) -> "_Quantized":
    """The QuantizeLinear of quantizer ``q`` (node ``n``) on value ``x``; after a linear layer run on 2-D
    integers (``flat``), its integers go back to the layer's N-D shape."""
    if n.args[0] not in flat:
        return _activation_qdq(b, q, x, len(shape_of(n) or []))
    qv = _activation_qdq(b, q, x, 2)
    shape, like = flat.pop(n.args[0])
    qv.q = _back_to_nd(b, qv.q, like, shape, b.fresh(f"{qv.name}_nd"), qv.name)
    return qv


def _back_to_nd(b: _Builder, y: str, like: str, shape, out: str, base: str) -> str:
    """The 2-D rows ``y`` of a linear layer run on an N-D input reshaped back to its N-D output ``shape``; with
    symbolic sizes the leading dimensions are read at run time from ``like`` (the layer's N-D input)."""
    if not b.dynamic_size:
        return _reshape(b, y, shape, out, base, [-1, shape[-1]])
    lead = b.node("Shape", [like], base=f"{base}_lead", start=0, end=-1)
    target = b.node("Concat", [lead, b.const(f"{base}_features", np.array(shape[-1:], dtype=np.int64))],
                    base=f"{base}_nd_shape", axis=0)
    return b.node("Reshape", [y, target], out=out, base=base)


def _shape_or_selection(b: _Builder, n: fx.Node, val: dict, folded: dict, want: dict, shape_of, batch: set) -> bool:
    """Handle ``n`` if it is shape arithmetic (folded to a value), an op on parameters and constants only (folded to
    an initializer), a shape assertion (checked here) or one output of a multi-output op (chunk, split, unbind); False
    for every other node."""
    if n.op not in ("call_method", "call_function"):
        return False
    static = _static_value(n, folded, shape_of)
    if static is not None:
        folded[n] = val[n] = static
        if _reads_batch(n, batch):
            batch.add(n)
        return True
    constant = _constant_tensor(n, folded, batch)
    if constant is not None:
        folded[n] = constant
        val[n] = b.const(f"{n.name}_folded", constant.detach().cpu().numpy())
        if n in want:
            val[n] = b.node("Identity", [val[n]], out=want[n])
        return True
    if n.target is torch._assert and n.args and n.args[0] in folded:
        if not folded[n.args[0]]:
            raise ExportError(f"{n.name}: the model's own assertion fails on the recorded shapes")
        return True
    if n.target is operator.getitem and isinstance(val.get(n.args[0]), list) and isinstance(n.args[1], int):
        val[n] = val[n.args[0]][n.args[1]]
        if n in want:
            val[n] = b.node("Identity", [_resolve(b, val[n])], out=want[n])
        return True
    return False


def _constant_tensor(n: fx.Node, folded: dict, batch: set) -> Optional[torch.Tensor]:
    """The value of a function or method node that reads parameters, buffers and folded constants only (naflexvit's
    position-embedding resize, a relative position bias gathered from its table), computed by torch at export: an
    initializer in place of ops ONNX Runtime would rerun on every inference, or that torch.onnx cannot export at all
    (antialiased bicubic resize). None for other nodes, and for anything sized by the batch."""
    if n.op not in ("call_function", "call_method") or n.target is torch._assert:
        return None
    ins = {}
    for a in n.all_input_nodes:
        if a.op == "get_attr":
            ins[a] = operator.attrgetter(a.target)(n.graph.owning_module)
        elif a in folded and a not in batch:
            ins[a] = folded[a]
        else:
            return None
    if not any(isinstance(v, torch.Tensor) for v in ins.values()):
        return None
    with torch.no_grad():
        y = evaluate(n, ins)
    return y if isinstance(y, torch.Tensor) else None


def _value_info(name: str, n: fx.Node, shape, dynamic_batch: bool):
    """A graph input/output: float32, or the recorded integer type (token ids)."""
    dtype = getattr(n.meta.get("tensor_meta"), "dtype", torch.float32)
    elem = TensorProto.FLOAT if dtype == torch.float32 else \
        helper.np_dtype_to_tensor_dtype(np.dtype(str(dtype).replace("torch.", "")))
    if shape is None:
        return helper.make_tensor_value_info(name, elem, None)
    return helper.make_tensor_value_info(name, elem, ["N" if (i == 0 and dynamic_batch) else d for i, d in enumerate(shape)])


def _resolve(b: _Builder, v):
    return v.dequantized(b) if isinstance(v, _Quantized) else v


def _module(b: _Builder, n: fx.Node, m: nn.Module, a: list, out: str, modules, shape_of) -> str:
    x = a[0]
    name = n.target
    ndim = len(shape_of(n) or [])
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                      nn.Linear, nn.Embedding)):
        if own_forward(m):
            raise ExportError(f"{name}: {type(m).__name__} computes in its own forward (e.g. its own padding or weight "
                              "standardization); exporting it from its attributes would be wrong, so it is refused. Rewrite "
                              "it as a plain layer plus ops (F.pad before nn.Conv2d) to export it")
        return _weighted(b, n, m, x, out, modules, ndim)
    if own_forward(m):
        raise _NoMapping(name)  # exported from its own forward by torch.onnx (e.g. timm's BatchNormAct2d), in float
    if ops.is_identity(n, modules):
        return x
    if isinstance(m, ChannelScale):
        return b.node("Mul", [x, b.const(f"{name}.scale", m.scale.detach().cpu().numpy())], out=out, base=name)
    if isinstance(m, ChannelClamp):
        shape = [-1] + [1] * (ndim - 2) if m.channel_axis == 1 else [-1]
        lo = b.const(f"{name}.lo", m.lo.detach().cpu().numpy().reshape(shape))
        hi = b.const(f"{name}.hi", m.hi.detach().cpu().numpy().reshape(shape))
        y = b.node("Max", [x, lo], base=name)
        return b.node("Min", [y, hi], out=out, base=name)
    if isinstance(m, nn.ReLU6) or isinstance(m, nn.Hardtanh):
        return b.node("Clip", [x, b.const(f"{name}.min", np.float32(m.min_val)), b.const(f"{name}.max", np.float32(m.max_val))],
                      out=out, base=name)
    simple = {nn.ReLU: "Relu", nn.Sigmoid: "Sigmoid", nn.Tanh: "Tanh", nn.Hardswish: "HardSwish"}
    for t, op in simple.items():
        if isinstance(m, t):
            return b.node(op, [x], out=out, base=name)
    if isinstance(m, nn.Hardsigmoid):
        return b.node("HardSigmoid", [x], out=out, base=name, alpha=1.0 / 6, beta=0.5)
    if isinstance(m, nn.LeakyReLU):
        return b.node("LeakyRelu", [x], out=out, base=name, alpha=float(m.negative_slope))
    if isinstance(m, nn.SiLU):
        return b.node("Mul", [x, b.node("Sigmoid", [x], base=name)], out=out, base=name)
    if isinstance(m, nn.Softmax):
        return b.node("Softmax", [x], out=out, base=name, axis=int(m.dim if m.dim is not None else -1))
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        c = m.num_features
        g = m.weight if m.affine else torch.ones(c)
        bb = m.bias if m.affine else torch.zeros(c)
        ins = [x] + [b.const(f"{name}.{k}", t.detach().cpu().float().numpy()) for k, t in
                     (("weight", g), ("bias", bb), ("running_mean", m.running_mean), ("running_var", m.running_var))]
        return b.node("BatchNormalization", ins, out=out, base=name, epsilon=float(m.eps))
    if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        osz = m.output_size if isinstance(m.output_size, (tuple, list)) else [m.output_size]
        if all(o == 1 for o in osz):
            return b.node("GlobalAveragePool", [x], out=out, base=name)
        raise _NoMapping(name)  # no integer kernel: the float op between DQ and Q
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        nd = ndim - 2
        tup = lambda v: list(v) if isinstance(v, (tuple, list)) else [v] * nd  # noqa: E731
        attrs = dict(kernel_shape=tup(m.kernel_size), strides=tup(m.stride or m.kernel_size), pads=tup(m.padding) * 2,
                     ceil_mode=int(m.ceil_mode))
        if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            if any(d != 1 for d in tup(m.dilation)) or m.return_indices:
                raise ExportError(f"{name}: MaxPool with dilation or return_indices is not exported")
            return b.node("MaxPool", [x], out=out, base=name, **attrs)
        return b.node("AveragePool", [x], out=out, base=name, count_include_pad=int(m.count_include_pad), **attrs)
    if isinstance(m, nn.Flatten):
        in_ndim = len(shape_of(n.args[0]) or [])
        if m.start_dim % max(in_ndim, 1) != 1 or m.end_dim % max(in_ndim, 1) != in_ndim - 1:  # ONNX Flatten makes 2-D
            return _reshape(b, x, shape_of(n), out, name, shape_of(n.args[0]))
        return b.node("Flatten", [x], out=out, base=name, axis=1)
    raise _NoMapping(name)


def _linear_nd(b: _Builder, n: fx.Node, m: nn.Linear, src: "_Quantized", out: str, modules, shape_of, flat: dict) -> str:
    """A linear layer on an N-D quantized input (tokens, windows) as ONNX Runtime runs it fastest: the input's
    integers reshaped to 2-D, then DequantizeLinear -> Gemm -> QuantizeLinear, which ONNX Runtime fuses into
    its integer QGemm (int32 accumulation with the int32 bias, one requantization: the arithmetic of the
    integer-exact sim); the output integers go back to N-D after the quantizer. (MatMul + Add on the N-D
    input became a float Gemm between DequantizeLinear and QuantizeLinear in ONNX Runtime.)"""
    in_shape, out_shape = shape_of(n.args[0]), shape_of(n)
    x2 = b.node("Reshape", [src.q, b.const(f"{n.target}_2d", np.array([-1, in_shape[-1]], dtype=np.int64))],
                base=f"{n.target}_2d")
    user, act = patterns.only_user(n), None
    if user is not None and ops.is_fusable_act(user, modules) and not isinstance(patterns.module_of(user, modules), ChannelClamp):
        act, user = user, patterns.only_user(user)  # linear -> ReLU -> quantizer: the ReLU runs on the 2-D values
    q = patterns.module_of(user, modules) if user is not None else None
    fused = isinstance(q, Quantizer) and isinstance(q.spec.granularity, PerTensor)
    q_in = lowering.source_quantizer(n.args[0], modules)
    if not (fused and q.spec.bits <= 8) and lowering.integer_matmul_fits(q_in, _weight_quantizer(m)):
        y = _matmul_integer(b, n, m, x2, src, q_in, out if fused else b.fresh(f"{out}_2d"))
    else:
        x = _Quantized(x2, src.scale, src.zero_point, src.name).dequantized(b)
        y = _weighted(b, n, m, x, out if fused else b.fresh(f"{out}_2d"), modules, 2)
    if fused:
        flat[act if act is not None else n] = (out_shape, src.q)
        return y
    return _back_to_nd(b, y, src.q, out_shape, out, n.target)


def _matmul_integer(b: _Builder, n: fx.Node, m: nn.Linear, x2: str, src: "_Quantized", q_in: Quantizer, out: str) -> str:
    """A linear layer whose output is not an 8-bit grid (a 16-bit residual stream) on ONNX Runtime's integer
    ``MatMulInteger``: the 8-bit input integers times the integer weights, accumulated in int32, then
    ``acc * s_x s_w + bias`` in float (what a fused ``QGemm`` cannot do: its output must be 8-bit)."""
    q_w = _weight_quantizer(m)
    name = n.target
    w, wzp = _weight_integers(b, q_w, m.weight, TensorProto.INT8)  # uint8 + 128 with unsigned weights (u8u8 kernels)
    wt = b.node("Transpose", [w], base=f"{name}.weight_t", perm=[1, 0])
    acc = b.node("MatMulInteger", [x2, wt, src.zero_point, wzp], base=name)
    s_acc = bias_scale(q_in.scale, q_w.scale, m.out_features).cpu().numpy()  # the accumulator's step s_x * s_w
    y = b.node("Mul", [b.node("Cast", [acc], base=name, to=TensorProto.FLOAT),
                       b.const(f"{name}.acc_scale", s_acc.astype(np.float32))], base=name,
               out=out if m.bias is None else None)
    if m.bias is None:
        return y
    bq, s_b = _bias_grid(m, q_in.scale, q_w)
    return b.node("Add", [y, b.const(f"{name}.bias", (bq * s_b).astype(np.float32))], out=out, base=name)


def _reshape(b, x, shape, out, base, in_shape=None):
    """A reshape to the recorded ``shape``; its first dimension follows the input's batch (0) when the
    reshape keeps it, else -1 (windows folded into the batch axis: ``B * windows``)."""
    if shape is None:
        raise ExportError(f"{base}: unknown output shape for reshape")
    first = 0 if in_shape is None or (len(in_shape) and in_shape[0] == shape[0]) else -1
    target = np.array([first] + list(shape[1:]), dtype=np.int64)
    return b.node("Reshape", [x, b.const(f"{base}_shape", target)], out=out, base=base)


def _function(b: _Builder, n: fx.Node, a: list, out: str, shape_of) -> str:
    t = n.target
    base = n.name
    if t in _NOOP_METHODS or ops.is_identity(n, {}):
        src, dst = (getattr(patterns.recorded_meta(v), "dtype", None) for v in (n.args[0], n))
        if src is not None and dst is not None and src != dst:  # x.to(torch.bool), x.type_as(mask): a cast
            to = helper.np_dtype_to_tensor_dtype(np.dtype(str(dst).replace("torch.", "")))
            return b.node("Cast", [a[0]], out=out, base=base, to=to)
        return a[0]
    binary = {operator.add: "Add", torch.add: "Add", "add": "Add", operator.mul: "Mul", torch.mul: "Mul", "mul": "Mul",
              operator.sub: "Sub", torch.sub: "Sub", "sub": "Sub", operator.truediv: "Div", torch.div: "Div", "div": "Div",
              operator.matmul: "MatMul", torch.matmul: "MatMul", "matmul": "MatMul"}
    if t in binary:
        if len(n.kwargs) and set(n.kwargs) - {"alpha"} or n.kwargs.get("alpha", 1) != 1:
            raise _NoMapping(base)  # div(rounding_mode="floor"), add(alpha=2): torch.onnx writes them
        meta = patterns.recorded_meta(n)
        dtype = getattr(meta, "dtype", torch.float32)
        if any(getattr(patterns.recorded_meta(x), "dtype", dtype) != dtype for x in n.args[:2] if isinstance(x, fx.Node)):
            raise _NoMapping(f"{base}: mixed dtypes")  # int / int -> float, int + bool, ...: torch.onnx knows the casts
        np_dtype = np.dtype(str(dtype).replace("torch.", ""))
        ins = [v if isinstance(v, str) else b.const(f"{base}_const", np.array(v, dtype=np_dtype)) for v in a[:2]]
        return b.node(binary[t], ins, out=out, base=base)
    if t in (F.relu, torch.relu, "relu"):
        return b.node("Relu", a[:1], out=out, base=base)
    if t is F.relu6:
        return b.node("Clip", [a[0], b.const(f"{base}_min", np.float32(0)), b.const(f"{base}_max", np.float32(6))], out=out, base=base)
    if t in (torch.sigmoid, F.sigmoid, "sigmoid"):
        return b.node("Sigmoid", a[:1], out=out, base=base)
    if t in (torch.ops.aten.fill.Tensor, torch.ops.aten.fill.Scalar) and len(a) == 2:  # a functional fill_
        dtype = getattr(patterns.recorded_meta(n), "dtype", None)
        if dtype is None:
            raise _NoMapping(base)
        to = helper.np_dtype_to_tensor_dtype(np.dtype(str(dtype).replace("torch.", "")))
        value = a[1] if isinstance(a[1], str) else b.const(f"{base}_value", np.array(a[1]))
        value = b.node("Cast", [value], base=f"{base}_value", to=to)
        return b.node("Expand", [value, b.node("Shape", [a[0]], base=base)], out=out, base=base)
    if t in (torch.cat, torch.concat):
        dim = n.kwargs.get("dim", a[1] if len(a) > 1 else 0)
        return b.node("Concat", list(a[0]), out=out, base=base, axis=int(dim))
    moved = _shape_move(b, n, t, a, out, base, shape_of)
    if moved is not None:
        return moved
    if t in (F.adaptive_avg_pool2d,) and tuple(np.atleast_1d(a[1])) in ((1,), (1, 1)):
        return b.node("GlobalAveragePool", [a[0]], out=out, base=base)
    if t in (torch.mean, "mean"):
        dims = n.kwargs.get("dim", a[1] if len(a) > 1 else None)
        keep = n.kwargs.get("keepdim", a[2] if len(a) > 2 else False)
        if dims is None or n.kwargs.get("dtype") is not None:
            raise _NoMapping(base)
        dims = [dims] if isinstance(dims, int) else list(dims)
        if b.opset < 18:  # axes became an input in opset 18
            return b.node("ReduceMean", [a[0]], out=out, base=base, axes=dims, keepdims=int(keep))
        return b.node("ReduceMean", [a[0], b.const(f"{base}_axes", np.array(dims, dtype=np.int64))], out=out, base=base,
                      keepdims=int(keep))
    if t is operator.getitem and lowering.plain_index(n.args[1]):
        return _getitem(b, a[1], a[0], out, base, len(shape_of(n.args[0]) or []))
    raise _NoMapping(base)


def _shape_move(b: _Builder, n: fx.Node, t, a: list, out: str, base: str, shape_of) -> Optional[str]:
    """Flatten, (un)squeeze, transpose/permute, tile/repeat and view/reshape as ONNX ops, or None for other ops."""
    if t in (torch.flatten, "flatten"):
        start = n.kwargs.get("start_dim", a[1] if len(a) > 1 else 0)
        end = n.kwargs.get("end_dim", a[2] if len(a) > 2 else -1)
        in_ndim = len(shape_of(n.args[0]) or [])
        if start % max(in_ndim, 1) == 1 and end % max(in_ndim, 1) == in_ndim - 1:  # ONNX Flatten's output is 2-D
            return b.node("Flatten", [a[0]], out=out, base=base, axis=1)
        return _reshape(b, a[0], shape_of(n), out, base, shape_of(n.args[0]))
    if t in (torch.unsqueeze, "unsqueeze", torch.squeeze, "squeeze"):
        dims = n.kwargs.get("dim", a[1] if len(a) > 1 else None)
        if dims is None:
            raise _NoMapping(base)
        dims = [int(d) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        op = "Unsqueeze" if t in (torch.unsqueeze, "unsqueeze") else "Squeeze"
        if op == "Squeeze":
            in_shape = shape_of(n.args[0]) or []
            dims = [d for d in dims if in_shape and in_shape[d] == 1]  # torch squeezes only the size-1 ones
            if not dims:
                return b.node("Identity", [a[0]], out=out, base=base)
        return b.node(op, [a[0], b.const(f"{base}_axes", np.array(dims, dtype=np.int64))], out=out, base=base)
    if t in (torch.transpose, "transpose", torch.permute, "permute"):
        ndim = len(shape_of(n) or [])
        if t in (torch.transpose, "transpose"):
            d0, d1 = (n.kwargs.get(k, a[i]) if len(a) > i else n.kwargs[k] for i, k in ((1, "dim0"), (2, "dim1")))
            perm = list(range(ndim))
            perm[d0 % ndim], perm[d1 % ndim] = perm[d1 % ndim], perm[d0 % ndim]
        else:
            dims = n.kwargs.get("dims", a[1] if len(a) == 2 and isinstance(a[1], (list, tuple)) else a[1:])
            perm = [int(d) % ndim for d in dims]
        return b.node("Transpose", [a[0]], out=out, base=base, perm=perm)
    if t in ("tile", torch.tile, "repeat"):  # constant repeats (folded shape arithmetic): ONNX Tile
        reps = n.kwargs.get("dims", a[1] if len(a) == 2 and isinstance(a[1], (list, tuple)) else a[1:])
        in_ndim = len(shape_of(n.args[0]) or [])
        reps = [1] * (in_ndim - len(reps)) + list(reps)  # tile pads the repeats with leading ones
        if len(reps) != in_ndim or not all(isinstance(r, int) for r in reps):  # repeat that adds dims, traced reps
            raise _NoMapping(base)
        return b.node("Tile", [a[0], b.const(f"{base}_repeats", np.array(reps, dtype=np.int64))], out=out, base=base)
    if t in ops.SPLITS:
        return _split(b, n, a[0], base)
    if t in ("view", "reshape", torch.reshape):
        target = _runtime_target(b, n) if b.dynamic_size else None
        if target is not None:  # x.view(b, g, c // g, h, w): sizes read from shapes at run time
            return b.node("Reshape", [a[0], target], out=out, base=base)
        return _reshape(b, a[0], shape_of(n), out, base, shape_of(n.args[0]))
    if t in (torch.roll, "roll"):
        return _roll(b, n, a, out, base, shape_of(n.args[0]))
    return None


def _split(b: _Builder, n: fx.Node, x: str, base: str) -> list[str]:
    """``torch.split`` / ``chunk`` as one ONNX ``Split`` into the recorded part sizes."""
    parts = n.meta.get("tensor_meta")
    if not isinstance(parts, (tuple, list)) or not all(hasattr(p, "shape") for p in parts):
        raise _NoMapping(base)
    dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else 0)
    sizes = b.const(f"{base}_sizes", np.array([p.shape[dim] for p in parts], dtype=np.int64))
    outs = [b.fresh(f"{base}_{i}") for i in range(len(parts))]
    b.nodes.append(helper.make_node("Split", [x, sizes], outs, name=b.fresh(f"{base}/Split"), axis=int(dim)))
    return outs


_SHAPE_ARITHMETIC = {operator.mul: "Mul", operator.floordiv: "Div", operator.add: "Add", operator.sub: "Sub"}
_END = np.iinfo(np.int64).max


def _runtime_target(b: _Builder, n: fx.Node) -> Optional[str]:
    """The target of reshape ``n`` as ONNX ops on the shapes it reads (``Shape``, ``Slice``, integer arithmetic,
    ``Concat``), for an export whose sizes are symbolic; None when the target is all constants or holds a value
    that is neither an int nor shape arithmetic on a graph value (the recorded shape is written then)."""
    dims = n.kwargs.get("shape", n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else n.args[1:])
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    if not any(isinstance(d, fx.Node) for d in dims):
        return None
    parts = [_shape_value(b, d) for d in dims]
    if any(p is None for p in parts):
        return None
    return b.node("Concat", parts, base=f"{n.name}_target", axis=0)


def _shape_value(b: _Builder, v) -> Optional[str]:
    """A 1-D int64 ONNX value computing ``v``: an int, a tensor's shape (``x.shape``, ``x.size()``, ``x.size(d)``),
    an element or slice of one, or ``*``, ``//``, ``+``, ``-`` of two such; None for anything else."""
    if isinstance(v, int) and not isinstance(v, bool):
        return b.const("dim", np.array([v], dtype=np.int64))
    if not isinstance(v, fx.Node):
        return None
    if v.target in _SHAPE_ARITHMETIC:
        left, right = (_shape_value(b, x) for x in v.args[:2])
        return None if left is None or right is None else b.node(_SHAPE_ARITHMETIC[v.target], [left, right], base=v.name)
    if v.target is operator.getitem and isinstance(v.args[0], fx.Node):
        idx = v.args[1]
        if isinstance(idx, int):  # one element, kept as a 1-element vector
            idx = slice(idx, idx + 1 if idx != -1 else None)
        whole = _shape_value(b, v.args[0])
        if (whole is None or not isinstance(idx, slice) or idx.step not in (None, 1)
                or not all(x is None or isinstance(x, int) for x in (idx.start, idx.stop))):
            return None
        bounds = [np.array([x], np.int64) for x in (idx.start or 0, _END if idx.stop is None else idx.stop)]
        return b.node("Slice", [whole, b.const("start", bounds[0]), b.const("end", bounds[1])], base=v.name)
    shaped = (v.target is getattr and v.args[1] == "shape") or (v.op == "call_method" and v.target == "size")
    src = b.values.get(v.args[0]) if shaped else None
    name = src.q if isinstance(src, _Quantized) else src
    if not isinstance(name, str):
        return None
    if v.target == "size" and len(v.args) > 1 and isinstance(v.args[1], int):
        d = v.args[1]
        return b.node("Shape", [name], base=v.name, start=d, **({"end": d + 1} if d != -1 else {}))
    return b.node("Shape", [name], base=v.name) if len(v.args) == (2 if v.target is getattr else 1) else None


def _roll(b: _Builder, n: fx.Node, a: list, out: str, base: str, shape) -> str:
    """``torch.roll`` along given dims (Swin's cyclic window shift) as Slice + Concat, on integers or floats."""
    shifts = n.kwargs.get("shifts", a[1] if len(a) > 1 else None)
    dims = n.kwargs.get("dims", a[2] if len(a) > 2 else None)
    if dims is None or shape is None:
        raise _NoMapping(base)  # a roll of the flattened tensor
    shifts, dims = ([v] if isinstance(v, int) else list(v) for v in (shifts, dims))
    x = a[0]
    moves = [(int(d) % len(shape), int(k) % shape[int(d)]) for k, d in zip(shifts, dims)]
    moves = [(d, k) for d, k in moves if k]
    if not moves:
        return b.node("Identity", [x], out=out, base=base)
    for i, (d, k) in enumerate(moves):
        size = shape[d]
        parts = [b.node("Slice", [x] + [b.const(f"{base}_{nm}", np.array([v], np.int64)) for nm, v in
                                         (("start", lo), ("end", hi), ("axis", d))], base=base)
                 for lo, hi in ((size - k, size), (0, size - k))]
        x = b.node("Concat", parts, out=out if i == len(moves) - 1 else None, base=base, axis=d)
    return x


def _getitem(b: _Builder, idx, x: str, out: str, base: str, ndim: int) -> str:
    """``x[idx]`` for a :func:`~edgequant.graph.lowering.plain_index` on an ``ndim``-D ``x``: Gather for each int (the
    axis goes), Slice for each slice; an ``...`` stands for the full slices it covers."""
    parts = list(idx) if isinstance(idx, tuple) else [idx]
    if Ellipsis in parts:
        if not ndim:
            raise _NoMapping(base)
        at = parts.index(Ellipsis)
        parts[at:at + 1] = [slice(None)] * (ndim - len(parts) + 1)
    steps, axis = [], 0
    for i in parts:
        if isinstance(i, int):
            steps.append(("Gather", axis, i))
        else:
            if i != slice(None):
                steps.append(("Slice", axis, i))
            axis += 1
    if not steps:
        return b.node("Identity", [x], out=out, base=base)
    for k, (op, ax, i) in enumerate(steps):
        o = out if k == len(steps) - 1 else None
        if op == "Gather":
            x = b.node("Gather", [x, b.const(f"{base}_index", np.array(i, np.int64))], out=o, base=base, axis=ax)
        else:
            lims = [i.start or 0, i.stop if i.stop is not None else np.iinfo(np.int64).max, ax, i.step or 1]
            x = b.node("Slice", [x] + [b.const(f"{base}_{nm}", np.array([v], np.int64)) for nm, v in zip(("start", "end", "axis", "step"), lims)],
                       out=o, base=base)
    return x
