"""ONNX export of quantized LSTM / GRU / RNN layers: the cell unrolled over the recorded sequence length.

Each time step is written out (an unrolled cell rather than ONNX's ``Loop`` or its float ``LSTM`` op):
ONNX Runtime then runs every matmul in integers (``MatMulInteger`` on the stored 8-bit codes, int32
bias, a float32 rescale), every sigmoid/tanh as a table lookup (``Gather`` from code to code) and the
elementwise cell updates in float32 between quantizations -- the operations of
:mod:`edgequant.core.recurrent`, so ORT's outputs are those of ``sim.integer_exact("float32")`` to the
bit. ONNX's ``LSTM``/``GRU``/``RNN`` ops are float-only, and a ``Loop`` body would hide the cell from
graph optimizers without saving time at these sequence lengths. Dequantization inside the cell is a table
lookup (``Gather`` of ``fp32(q - z) * s`` per code, the float32 of ``DequantizeLinear``; the sigmoid/tanh
tables give their outputs already dequantized, as only those are used), so ORT's QDQ fusions
(``QLinearMul``, ``QLinearAdd``, whose rounding differs) do not rewrite the cell, and a step is about 30
ONNX nodes.

The first time step's values carry the encodings' names (``rnn.l0.i_pre``, ``rnn.l0.c``, ...); later
steps get ``<name>/t<k>``. Initial states given to the layer are graph values quantized onto the ``h`` /
``c`` grids, as the sim does. Limits (refused by name): unbatched or packed inputs, inputs and hidden
states wider than 8 bits (``MatMulInteger`` takes 8-bit codes).
"""
from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto, helper

from ..core.quant import storage_offset
from ..core.lut import Grid, table
from ..errors import ExportError
from ..nn.quantizer import Quantizer
from ..nn.rnn import _directions, _int_matmul, cell_grids, tensor_key

_FNS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}


class _Grid:
    """Constants of one quantizer's grid in the graph (scale, stored zero point, as integer and as float),
    made when first used; its container and storage offset."""

    def __init__(self, b, q: Quantizer, container):
        self.b, self.q, self.name = b, q, q.tensor_name
        self.offset = storage_offset(q.spec.bits, q.spec.signed)
        if q.spec.bits <= 8:
            self.dtype, self.cmin = TensorProto.UINT8, 0
        else:
            self.dtype, self.cmin = container(q.spec.bits, q.spec.signed, b.opset)[:2]
        self.core = Grid(*q.scalar_grid(), q.qmin, q.qmax)
        self.zp = self.core.zero_point
        self._consts: dict[str, str] = {}

    def _const(self, key: str, make) -> str:
        if key not in self._consts:
            self._consts[key] = make()
        return self._consts[key]

    @property
    def s(self) -> str:
        return self._const("s", lambda: self.b.const(f"{self.name}_scale", np.float32(self.core.scale)))

    @property
    def z(self) -> str:
        def make():
            z = self.b.fresh(f"{self.name}_zero_point")
            self.b.names.discard(z)
            return self.b.int_const(z, np.array(self.zp + self.offset), self.dtype)
        return self._const("z", make)

    @property
    def z_f(self) -> str:
        return self._const("z_f", lambda: self.b.const(f"{self.name}_zero_point_f", np.float32(self.zp + self.offset)))


class _CellExport:
    """Writes one layer and direction of a quantized recurrent layer ``m`` into builder ``b``."""

    def __init__(self, b, m, k: int, d: str, helpers):
        self.b, self.m, self.k, self.d, self.h = b, m, k, d, helpers
        self.p = f"l{k}{d}"
        self.grids: dict[str, _Grid] = {}
        self.tables: dict[tuple, str] = {}
        self.weights: dict[str, tuple] = {}
        self.indices: dict[str, str] = {}  # codes -> their Gather indices

    # ------------------------------------------------------------ values
    def name(self, suffix: str) -> str:
        """The first step's value carries the tensor's name; later ones a fresh ``<name>/t``."""
        full = f"{self.m._tname}.{suffix}"
        return full if full not in self.b.names else self.b.fresh(f"{full}/t")

    def grid(self, suffix: str) -> _Grid:
        if suffix not in self.grids:
            q = self.m.tensor_quantizers[tensor_key(suffix)] if tensor_key(suffix) in self.m.tensor_quantizers else None
            if not isinstance(q, Quantizer):
                raise ExportError(f"{self.m._tname}.{suffix}: every tensor of a recurrent layer must be quantized to export it")
            self.grids[suffix] = _Grid(self.b, q, self.h["container"])
        return self.grids[suffix]

    def quantize(self, suffix: str, v: str) -> str:
        """QuantizeLinear of float ``v`` (named for the encodings) onto ``suffix``'s grid: the stored codes."""
        g = self.grid(suffix)
        return self.h["qdq"](self.b, g.q, v, 2).q

    def _index(self, suffix: str, codes: str) -> str:
        """The codes of ``suffix``'s grid as Gather indices into a table over the whole container (shared by
        every table looked up with the same codes)."""
        if codes not in self.indices:
            g, b = self.grid(suffix), self.b
            idx = b.node("Cast", [codes], base=g.name, to=TensorProto.INT32)
            if g.cmin != 0:
                idx = b.node("Sub", [idx, b.const(f"{g.name}_cmin", np.int32(g.cmin))], base=g.name)
            self.indices[codes] = idx
        return self.indices[codes]

    def _codes(self, g: _Grid) -> np.ndarray:
        """The grid code each container code stands for (clipped onto the grid), minus ``qmin``."""
        size = 65536 if g.dtype in (TensorProto.INT16, TensorProto.UINT16) else 256
        return np.clip(np.arange(size) + g.cmin - g.offset, g.q.qmin, g.q.qmax) - g.q.qmin

    def _table(self, key, make) -> str:
        if key not in self.tables:
            self.tables[key] = make()
        return self.tables[key]

    def dq(self, suffix: str, codes: str, out=None) -> str:
        """``fp32(q - z) * s`` of ``codes`` by table lookup (the same float32 as ``DequantizeLinear``, and no
        QDQ fusion applies)."""
        g, b = self.grid(suffix), self.b
        values = lambda: (np.arange(g.q.qmin, g.q.qmax + 1) - g.zp).astype(np.float32) * np.float32(g.core.scale)  # noqa: E731
        t = self._table(("dq", suffix), lambda: b.const(f"{g.name}_dequantized_table", values()[self._codes(g)]))
        return b.node("Gather", [t, self._index(suffix, codes)], out=out, base=g.name, axis=0)

    def lut(self, src: str, dst: str, fn: str, codes: str, out_suffix: str, as_float: bool = False) -> str:
        """``dst``'s codes for ``src``'s codes through the table of ``fn`` (a Gather); with ``as_float``, their
        dequantized values (one table: the activation's codes are used only dequantized)."""
        gs, gd, b = self.grid(src), self.grid(dst), self.b

        def make():
            core = table(_FNS[fn], self.m._grid(src), self.m._grid(dst)).cpu().numpy()[self._codes(gs)]
            if as_float:
                return b.const(f"{gd.name}_table", (core - gd.zp).astype(np.float32) * np.float32(gd.core.scale))
            name = b.fresh(f"{gd.name}_table")
            b.names.discard(name)
            return b.int_const(name, core + gd.offset, gd.dtype)
        t = self._table((src, dst, fn, as_float), make)
        return b.node("Gather", [t, self._index(src, codes)], out=self.name(out_suffix), base=gd.name, axis=0)

    def matmul(self, weight: str, bias, codes: str, src: _Grid) -> str:
        """``fp32((codes - z) W^T + b_q) * fp32(s_x s_w)`` (MatMulInteger, Add, Cast, Mul)."""
        b, m = self.b, self.m
        q_w = m.param_quantizers[weight] if weight in m.param_quantizers else None
        if not isinstance(q_w, Quantizer) or src.q.spec.bits > 8 or q_w.spec.bits > 8:
            raise ExportError(f"{m._tname}.{weight}: recurrent matmuls export with 8-bit inputs and quantized 8-bit "
                              "(or narrower) weights (MatMulInteger)")
        if weight not in self.weights:  # one set of constants per weight, shared by every time step
            im = _int_matmul(m, weight, bias, src.core)
            w, wzp = self.h["weight_integers"](b, q_w, getattr(m, weight), TensorProto.INT8)
            wt = b.node("Transpose", [w], base=f"{weight}_t", perm=[1, 0])
            self.weights[weight] = (wt, wzp, b.const(f"{m._tname}.{weight}_bias_q", im.bias.cpu().numpy().astype(np.int32)),
                                    b.const(f"{m._tname}.{weight}_multiplier", im.multiplier.cpu().numpy()))
        wt, wzp, bq, mult = self.weights[weight]
        acc = b.node("Add", [b.node("MatMulInteger", [codes, wt, src.z, wzp], base=f"{m._tname}.{weight}"), bq], base=weight)
        return b.node("Mul", [b.node("Cast", [acc], base=weight, to=TensorProto.FLOAT), mult], base=weight)

    def slices(self, v: str, parts: int, names=None) -> list[str]:
        """The ``parts`` gate blocks of ``v`` (named ``names`` where given)."""
        size, b = self.m.hidden_size, self.b
        names = names or [None] * parts
        return [b.node("Slice", [v, b.const("start", np.array([i * size], np.int64)), b.const("end", np.array([(i + 1) * size], np.int64)),
                                 b.const("axis", np.array([-1], np.int64))], out=names[i], base=f"{self.m._tname}.{self.p}")
                for i in range(parts)]

    def zeros(self, suffix: str, batch: str, width: int) -> str:
        """Codes of 0.0 on ``suffix``'s grid, shape (batch, width)."""
        g, b = self.grid(suffix), self.b
        shape = b.node("Concat", [batch, b.const("width", np.array([width], np.int64))], base=g.name, axis=0)
        value = helper.make_tensor("value", g.dtype, [1], [g.zp + g.offset])
        return b.node("ConstantOfShape", [shape], base=g.name, value=value)

    # ------------------------------------------------------------ steps
    def lstm_step(self, px: str, h: str, c: str, c_f: str, proj) -> tuple[str, str, str]:
        """One step: codes ``h``, ``c`` and ``c``'s dequantized values in, the same out."""
        b, p = self.b, self.p
        pre = b.node("Add", [px, self.matmul(f"weight_hh_{p}", f"bias_hh_{p}", h, self.grid(f"l{self.k}.h"))], base=p)
        a = {}
        for gate, v in zip("ifgo", self.slices(pre, 4, [self.name(f"{p}.{g}_pre") for g in "ifgo"])):
            a[gate] = self.lut(f"{p}.{gate}_pre", f"{p}.{gate}", "tanh" if gate == "g" else "sigmoid",
                               self.quantize(f"{p}.{gate}_pre", v), f"{p}.{gate}", as_float=True)
        fc = b.node("Mul", [a["f"], c_f], base=p)
        ig = b.node("Mul", [a["i"], a["g"]], base=p)
        c = self.quantize(f"{p}.c", b.node("Add", [fc, ig], out=self.name(f"{p}.c")))
        tc = self.lut(f"{p}.c", f"{p}.tanh_c", "tanh", c, f"{p}.tanh_c", as_float=True)
        c_f = self.dq(f"{p}.c", c)  # shares tanh(c)'s index
        m = b.node("Mul", [a["o"], tc], out=None if proj else self.name(f"l{self.k}.h"))
        if proj:
            m = b.node("Identity", [m], out=self.name(f"{p}.m"))
            mq = self.quantize(f"{p}.m", m)
            m = b.node("Identity", [self.matmul(f"weight_hr_{p}", None, mq, self.grid(f"{p}.m"))], out=self.name(f"l{self.k}.h"))
        return self.quantize(f"l{self.k}.h", m), c, c_f

    def gru_step(self, px: str, h: str) -> str:
        b, p, hq = self.b, self.p, f"l{self.k}.h"
        xr, xz, xn = self.slices(px, 3)
        hr, hz, hn = self.slices(self.matmul(f"weight_hh_{p}", f"bias_hh_{p}", h, self.grid(hq)), 3, [None, None, self.name(f"{p}.hn")])
        gates = {}
        for g, x_, h_ in (("r", xr, hr), ("z", xz, hz)):
            v = b.node("Add", [x_, h_], out=self.name(f"{p}.{g}_pre"))
            gates[g] = self.lut(f"{p}.{g}_pre", f"{p}.{g}", "sigmoid", self.quantize(f"{p}.{g}_pre", v), f"{p}.{g}", as_float=True)
        rhn = b.node("Mul", [gates["r"], self.dq(f"{p}.hn", self.quantize(f"{p}.hn", hn))], out=self.name(f"{p}.rhn"))
        n_pre = b.node("Add", [xn, self.dq(f"{p}.rhn", self.quantize(f"{p}.rhn", rhn))], out=self.name(f"{p}.n_pre"))
        n = self.lut(f"{p}.n_pre", f"{p}.n", "tanh", self.quantize(f"{p}.n_pre", n_pre), f"{p}.n", as_float=True)
        new = b.node("Add", [n, b.node("Mul", [gates["z"], b.node("Sub", [self.dq(hq, h), n])])], out=self.name(hq))
        return self.quantize(hq, new)

    def rnn_step(self, px: str, h: str) -> str:
        b, p, hq = self.b, self.p, f"l{self.k}.h"
        pre = b.node("Add", [px, self.matmul(f"weight_hh_{p}", f"bias_hh_{p}", h, self.grid(hq))], out=self.name(f"{p}.pre"))
        fn = "tanh" if self.m.mode == "RNN_TANH" else "relu"
        return self.lut(f"{p}.pre", hq, fn, self.quantize(f"{p}.pre", pre), hq)

    def initial(self, state, index: int, suffix: str, batch: str, width: int) -> str:
        """Codes of the initial state: slice ``index`` of the float ``state`` (layers * directions, B, H) put on
        ``suffix``'s grid, or the codes of zeros when the layer was called without it."""
        if state is None:
            return self.zeros(suffix, batch, width)
        b = self.b
        v = b.node("Gather", [state, b.const("state_index", np.array(index, np.int64))], base=suffix, axis=0)
        return self.quantize(suffix, b.node("Identity", [v], out=self.name(suffix)))

    def run(self, x: str, x_grid, steps: int, batch: str, hx=(None, None), index: int = 0) -> tuple[str, str, str]:
        """The direction over time-major codes ``x``: ``(codes (T, B, H), final h codes, final c codes)``;
        ``hx``: the float initial states given to the layer (or None), ``index`` this direction's slice."""
        b, m, p = self.b, self.m, self.p
        try:
            cell_grids(m, self.k, self.d)  # every tensor quantized and per-tensor, or a clear error now
        except ValueError as e:
            raise ExportError(f"{m._tname}: {e}") from None
        px_all = self.matmul(f"weight_ih_{p}", f"bias_ih_{p}", x, x_grid)
        h_size = m.proj_size if m.mode == "LSTM" and m.proj_size > 0 else m.hidden_size
        h = self.initial(hx[0], index, f"l{self.k}.h", batch, h_size)
        c = self.initial(hx[1], index, f"{p}.c", batch, m.hidden_size) if m.mode == "LSTM" else None
        c_f = self.dq(f"{p}.c", c) if c is not None else None
        outs = [None] * steps
        for t in (range(steps - 1, -1, -1) if self.d else range(steps)):
            px = b.node("Gather", [px_all, b.const("t", np.array(t, np.int64))], base=p, axis=0)
            if m.mode == "LSTM":
                h, c, c_f = self.lstm_step(px, h, c, c_f, m.proj_size > 0)
            elif m.mode == "GRU":
                h = self.gru_step(px, h)
            else:
                h = self.rnn_step(px, h)
            outs[t] = b.node("Unsqueeze", [h, b.const("axis0", np.array([0], np.int64))], base=p)
        return b.node("Concat", outs, base=p, axis=0), h, c


def export_recurrent(b, node, m, x, in_shape, helpers, hx=None) -> list:
    """The ONNX of quantized recurrent layer ``m`` (fx ``node``) on quantized input ``x`` (``hx``: the float
    initial states, ``h0`` or ``(h0, c0)``, or None): ``[output, (h_n, c_n)]`` (LSTM) or ``[output, h_n]``,
    each a quantized value where it is on one grid."""
    name = node.target
    m._tname = name
    hx = (hx if isinstance(hx, (tuple, list)) else (hx, None)) if hx is not None else (None, None)
    if not isinstance(x, helpers["Quantized"]):
        raise ExportError(f"{name}: the input of a quantized {type(m).__name__} must be quantized to export it")
    if in_shape is None or len(in_shape) != 3:
        raise ExportError(f"{name}: only batched 3-D inputs are exported (recorded shape {in_shape})")
    codes = b.node("Transpose", [x.q], base=name, perm=[1, 0, 2]) if m.batch_first else x.q
    steps = in_shape[1] if m.batch_first else in_shape[0]
    batch = b.node("Shape", [codes], base=f"{name}_batch", start=1, end=2)
    q_in = m._in_quantizer(0)
    if q_in is None:
        raise ExportError(f"{name}: no quantizer before the layer gives its input grid")
    src = _Grid(b, q_in, helpers["container"])
    h_n, c_n, dirs = [], [], _directions(m)
    for k in range(m.num_layers):
        outs = []
        for j, d in enumerate(dirs):
            cell = _CellExport(b, m, k, d, helpers)
            seq, h, c = cell.run(codes, src, steps, batch, hx, k * len(dirs) + j)
            outs.append(seq)
            h_n.append((cell.grid(f"l{k}.h"), h))
            c_n.append((cell.grid(f"l{k}{d}.c"), c) if c is not None else None)
        codes = b.node("Concat", outs, base=f"{name}.l{k}", axis=2) if len(outs) > 1 else outs[0]
        src = cell.grid(f"l{k}.h")
    out = b.node("Transpose", [codes], base=name, perm=[1, 0, 2]) if m.batch_first else codes
    out = helpers["Quantized"](out, src.s, src.z, src.name)
    hn = _stack(b, h_n, helpers, name)
    if m.mode != "LSTM":
        return [out, hn]
    return [out, [hn, _stack(b, c_n, helpers, name)]]


def _stack(b, states, helpers, name):
    """``(layers * directions, B, H)``: codes on one grid when every state shares it, else float values."""
    ax = b.const("axis0", np.array([0], np.int64))
    if len({g.name for g, _ in states}) == 1:
        g = states[0][0]
        return helpers["Quantized"](b.node("Concat", [b.node("Unsqueeze", [v, ax]) for _, v in states], base=name, axis=0),
                                    g.s, g.z, g.name)
    vals = []
    for g, v in states:
        f = b.node("Cast", [v], to=TensorProto.FLOAT)
        vals.append(b.node("Unsqueeze", [b.node("Mul", [b.node("Sub", [f, g.z_f]), g.s]), ax]))
    return b.node("Concat", vals, base=name, axis=0)
