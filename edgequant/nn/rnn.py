r"""Quantized ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN``: the recurrence unrolled, every tensor on its own grid.

QuantSim turns each recurrent layer into its quantized twin (the same class underneath, the same
state_dict names plus ``param_quantizers.*`` and ``tensor_quantizers.*``). The twin runs the cell step by
step in Python, with a quantizer on each tensor an integer kernel stores (``<layer>.<suffix>`` in the plan;
``l<k>`` is layer ``k``, ``l<k>_reverse`` its backward direction):

=========================  ==========================================================  ==================
tensor                     what                                                        default grid
=========================  ==========================================================  ==================
``weight_ih_l<k>`` ...     the weights, per output row (so per gate and unit)          the weight spec
``l<k>.<gate>_pre``        gate pre-activations ``x W_ih^T + b_ih + h W_hh^T + b_hh``  the activation spec
``l<k>.<gate>``            gate activations (sigmoid, tanh): ranges known, no data     fixed ``[0, 1]`` / ``[-1, 1]``
``l<k>.c``                 LSTM cell state                                             16 bits, min-max
``l<k>.tanh_c``            ``tanh(c)``                                                 fixed ``[-1, 1]``
``l<k>.m``                 LSTM with ``proj_size``: ``o * tanh(c)`` before the projection  the activation spec
``l<k>.hn``, ``l<k>.rhn``  GRU: ``h W_hn^T + b_hn`` and ``r * (h W_hn^T + b_hn)``     the activation spec
``l<k>.h``                 the hidden state = the layer's output (both directions)      the activation spec
=========================  ==========================================================  ==================

LSTM gates are ``i, f, g, o``, GRU gates ``r, z, n``; a plain RNN has ``l<k>.pre`` and ``l<k>.h``. The
biases go onto the int32 accumulator grids ``s_x s_wih`` and ``s_h s_whh`` like a linear layer's. Initial
states passed by the caller are quantized onto the ``h`` and ``c`` grids. During calibration each tensor is
observed once per batch over the whole sequence (per-sample statistics span every time step). With every
quantizer disabled the twin computes what the torch layer computes (float tolerance), forward and
backward; it supports several layers, bidirectional, ``batch_first``, unbatched input, given or absent
initial states, ``proj_size``, dropout between layers in training and ``PackedSequence`` inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ..core.granularity import PerChannel, PerTensor
from ..core.quant import bias_integers, bias_scale
from ..core.quant import quantize
from ..core.lut import Grid, table
from ..core.recurrent import CellGrids, IntMatmul, gru_step, lstm_step, rnn_step
from .modules import QuantizedModuleMixin, float_class_of, quantized_class
from .quantizer import Quantizer
from .registry import TensorSite, register_quantized

_SIGMOID, _TANH = (0.0, 1.0), (-1.0, 1.0)


def _mode(m: nn.Module) -> str:
    return m.mode if isinstance(m, nn.RNNBase) else type(m).__name__  # "LSTM", "GRU", "RNN_TANH", "RNN_RELU"


def _directions(m) -> list[str]:
    return ["", "_reverse"] if m.bidirectional else [""]


def rnn_params(m: nn.RNNBase) -> dict[str, int]:
    """Every weight of the layer, per output row (axis 0: one scale per gate and unit)."""
    return {n: 0 for n in m._flat_weights_names if n.startswith("weight")}


def rnn_tensors(m: nn.RNNBase) -> dict[str, TensorSite]:
    """The tensors the quantized twin puts on grids (see the module docstring)."""
    mode, h = _mode(m), m.hidden_size
    out = {}
    for k in range(m.num_layers):
        for d in _directions(m):
            p = f"l{k}{d}"
            if mode == "LSTM":
                for g in "ifgo":
                    out[f"{p}.{g}_pre"] = TensorSite((1, h))
                for g in "ifgo":
                    out[f"{p}.{g}"] = TensorSite((1, h), nonneg=g != "g", fixed_range=_TANH if g == "g" else _SIGMOID)
                out[f"{p}.c"] = TensorSite((1, h), bits=16)
                out[f"{p}.tanh_c"] = TensorSite((1, h), fixed_range=_TANH)
                if m.proj_size > 0:
                    out[f"{p}.m"] = TensorSite((1, h))
            elif mode == "GRU":
                for g in "rz":
                    out[f"{p}.{g}_pre"] = TensorSite((1, h))
                    out[f"{p}.{g}"] = TensorSite((1, h), nonneg=True, fixed_range=_SIGMOID)
                out[f"{p}.hn"] = TensorSite((1, h))
                out[f"{p}.rhn"] = TensorSite((1, h))
                out[f"{p}.n_pre"] = TensorSite((1, h))
                out[f"{p}.n"] = TensorSite((1, h), fixed_range=_TANH)
            else:
                out[f"{p}.pre"] = TensorSite((1, h))
        h_out = m.proj_size if mode == "LSTM" and m.proj_size > 0 else h
        out[f"l{k}.h"] = TensorSite((1, h_out), nonneg=mode == "RNN_RELU")
    return out


def tensor_key(suffix: str) -> str:
    """The ModuleDict key of a tensor suffix (no dots)."""
    return suffix.replace(".", "__")


class QuantizedRecurrentMixin(QuantizedModuleMixin):
    """The forward of quantized LSTM / GRU / RNN layers (see the module docstring)."""

    tensor_quantizers: nn.ModuleDict
    #: ``{weight name: [input rows]}`` while set (AdaRound reads what each weight multiplies), else None
    _record = None
    #: set by ``QuantSim.integer_exact()``: run the cell on integers (:mod:`edgequant.core.recurrent`)
    _exact_requant = None

    def _grid(self, suffix: str) -> Grid:
        """The per-tensor grid of tensor ``suffix`` (integer-exact mode needs every one quantized)."""
        q = self._quantizer(suffix)
        return grid_of(q, f"{suffix} of a quantized {float_class_of(type(self)).__name__}")

    # ---------------------------------------------------------------- quantizers
    def _quantizer(self, suffix: str):
        q = self.tensor_quantizers[tensor_key(suffix)] if tensor_key(suffix) in self.tensor_quantizers else None
        return q if isinstance(q, Quantizer) else None

    def _q(self, suffix: str, x: torch.Tensor) -> torch.Tensor:
        q = self._quantizer(suffix)
        if q is None:
            return x
        if q._observer is not None:  # calibrating: observed once per batch over the whole sequence
            self._observed.setdefault(suffix, []).append(x.detach())
            return x
        return q(x)

    def _flush_observed(self) -> None:
        for suffix, xs in self._observed.items():
            self._quantizer(suffix)(torch.stack(xs, dim=-1))  # (batch, features, steps): channels on axis 1
        self._observed = {}

    def _w(self, name: str) -> torch.Tensor:
        p = getattr(self, name)
        q = self.param_quantizers[name] if name in self.param_quantizers else None
        return q(p) if isinstance(q, Quantizer) else p

    def _in_quantizer(self, k: int):
        """The quantizer of layer ``k``'s input: the graph's quantizer before the layer, or layer ``k-1``'s ``h``."""
        if k > 0:
            return self._quantizer(f"l{k - 1}.h")
        src = self._bias_input
        q = src[0][src[1]] if src is not None else None
        return q if isinstance(q, Quantizer) else None

    def _b(self, name: str, q_in, weight: str):
        """The bias on the int32 grid ``s_in s_w`` (straight through for training), or as it is."""
        bias = getattr(self, name, None) if self.bias else None
        q_w = self.param_quantizers[weight] if weight in self.param_quantizers else None
        if (bias is None or not isinstance(q_in, Quantizer) or not isinstance(q_w, Quantizer) or not q_in._ready
                or not q_w._ready or q_in._observer is not None or not isinstance(q_in.spec.granularity, PerTensor)
                or not isinstance(q_w.spec.granularity, (PerTensor, PerChannel))):
            return bias
        s64 = bias_scale(q_in.scale.detach(), q_w.scale.detach(), bias.shape[0]).to(bias.device)
        b = (bias_integers(bias, s64).double() * s64).to(bias.dtype)
        return bias + (b - bias).detach() if bias.requires_grad and torch.is_grad_enabled() else b

    def _rec(self, weight: str, rows: torch.Tensor) -> None:
        if self._record is not None:
            self._record.setdefault(weight, []).append(rows.detach().reshape(-1, rows.shape[-1]))

    # ---------------------------------------------------------------- cells
    def _lstm_step(self, p, k, ix, h, c, w_hh, b_hh, w_hr):
        gates = ix + F.linear(h, w_hh, b_hh)
        pre = dict(zip("ifgo", gates.chunk(4, -1)))
        act = {g: self._q(f"{p}.{g}", torch.tanh(self._q(f"{p}.{g}_pre", pre[g])) if g == "g"
                          else torch.sigmoid(self._q(f"{p}.{g}_pre", pre[g]))) for g in "ifgo"}
        c = self._q(f"{p}.c", act["f"] * c + act["i"] * act["g"])
        m = act["o"] * self._q(f"{p}.tanh_c", torch.tanh(c))
        if w_hr is not None:
            m = self._q(f"{p}.m", m)
            self._rec(f"weight_hr_{p}", m)
        h = self._q(f"l{k}.h", F.linear(m, w_hr) if w_hr is not None else m)
        return h, c

    def _gru_step(self, p, k, ix, h, w_hh, b_hh):
        ir, iz, in_ = ix.chunk(3, -1)
        hr, hz, hn = F.linear(h, w_hh, b_hh).chunk(3, -1)
        r = self._q(f"{p}.r", torch.sigmoid(self._q(f"{p}.r_pre", ir + hr)))
        z = self._q(f"{p}.z", torch.sigmoid(self._q(f"{p}.z_pre", iz + hz)))
        rhn = self._q(f"{p}.rhn", r * self._q(f"{p}.hn", hn))
        n = self._q(f"{p}.n", torch.tanh(self._q(f"{p}.n_pre", in_ + rhn)))
        return self._q(f"l{k}.h", n + z * (h - n))

    def _rnn_step(self, p, k, ix, h, w_hh, b_hh):
        pre = self._q(f"{p}.pre", ix + F.linear(h, w_hh, b_hh))
        return self._q(f"l{k}.h", torch.tanh(pre) if self.mode == "RNN_TANH" else torch.relu(pre))

    def _float_cell(self, x, k, d):
        """``(input projection of every step, step(px, h, c) -> (h, c))`` of the float sim."""
        p = f"l{k}{d}"
        q_in = self._in_quantizer(k)
        w_ih, w_hh = self._w(f"weight_ih_l{k}{d}"), self._w(f"weight_hh_l{k}{d}")
        w_hr = self._w(f"weight_hr_l{k}{d}") if self.mode == "LSTM" and self.proj_size > 0 else None
        b_ih = self._b(f"bias_ih_l{k}{d}", q_in, f"weight_ih_l{k}{d}")
        b_hh = self._b(f"bias_hh_l{k}{d}", self._quantizer(f"l{k}.h"), f"weight_hh_l{k}{d}")
        self._rec(f"weight_ih_l{k}{d}", x)
        ix = F.linear(x, w_ih, b_ih)  # every step's input projection at once

        def step(px, h, c):
            self._rec(f"weight_hh_l{k}{d}", h)
            if self.mode == "LSTM":
                return self._lstm_step(p, k, px, h, c, w_hh, b_hh, w_hr)
            if self.mode == "GRU":
                return self._gru_step(p, k, px, h, w_hh, b_hh), None
            return self._rnn_step(p, k, px, h, w_hh, b_hh), None
        return ix, step

    def _direction(self, x, k, d, h, c, lengths):
        """One layer, one direction over ``x`` (time, batch, features): ``(outputs, h_T, c_T)``; on
        integers in integer-exact mode."""
        if self._exact_requant is not None:
            cell = exact_cell(self, k, d)
            ix, step, pad = cell.ih(x), cell.step, cell.grids.grids["h"].zero_point
        else:
            (ix, step), pad = self._float_cell(x, k, d), 0
        steps = range(x.shape[0] - 1, -1, -1) if d else range(x.shape[0])
        outs = [None] * x.shape[0]
        for t in steps:
            h_new, c_new = step(ix[t], h, c)
            if lengths is not None:  # a packed sequence: past its end a sequence keeps its state, outputs 0
                valid = (t < lengths).unsqueeze(-1)
                h_new = torch.where(valid, h_new, h)
                c_new = torch.where(valid, c_new, c) if c_new is not None else None
                outs[t] = torch.where(valid, h_new, torch.full_like(h_new, pad))
            else:
                outs[t] = h_new
            h, c = h_new, c_new
        return torch.stack(outs), h, c

    # ---------------------------------------------------------------- forward
    def _initial(self, hx, batch, dtype, device):
        """Initial ``(h0, c0)``, shapes ``(layers * directions, batch, features)``, on their grids."""
        nd = self.num_layers * (2 if self.bidirectional else 1)
        h_size = self.proj_size if self.mode == "LSTM" and self.proj_size > 0 else self.hidden_size
        if self.mode == "LSTM":
            h0, c0 = hx if hx is not None else (None, None)
        else:
            h0, c0 = hx, None
        h0 = h0 if h0 is not None else torch.zeros(nd, batch, h_size, dtype=dtype, device=device)
        if self.mode == "LSTM" and c0 is None:
            c0 = torch.zeros(nd, batch, self.hidden_size, dtype=dtype, device=device)
        for name, t, size in (("h0", h0, h_size), ("c0", c0, self.hidden_size)):
            if t is not None and tuple(t.shape) != (nd, batch, size):
                raise ValueError(f"{type(self).__name__}: initial state {name} must have shape {(nd, batch, size)} "
                                 f"(layers * directions, batch, features), got {tuple(t.shape)}")
        return h0, c0

    def state_tensors(self, kind: str) -> list[str]:
        """The tensor suffix of each ``(layer, direction)`` slice of ``h_n`` (``kind="h"``) or ``c_n`` (``"c"``)."""
        return [f"l{k}.h" if kind == "h" else f"l{k}{d}.c" for k in range(self.num_layers) for d in _directions(self)]

    def run_layers(self, x, h0, c0, lengths=None, exact: bool = False):
        """Every layer over time-major ``x``: ``(output, [h_T per layer and direction], [c_T ...])``. With
        ``exact``, ``x`` holds the input grid's integers and so do the results (the integer engine and the
        sim's integer-exact mode); ``h0``/``c0`` are float and go onto their grids."""
        h_n, c_n = [], []
        for k in range(self.num_layers):
            outs = []
            for j, d in enumerate(_directions(self)):
                i = k * len(_directions(self)) + j
                if exact:
                    h, c = self._grid(f"l{k}.h").quantize(h0[i]), (self._grid(f"l{k}{d}.c").quantize(c0[i]) if c0 is not None else None)
                else:
                    h = self._q(f"l{k}.h", h0[i])
                    c = self._q(f"l{k}{d}.c", c0[i]) if c0 is not None else None
                out, h, c = self._direction(x, k, d, h, c, lengths)
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outs, -1) if len(outs) > 1 else outs[0]
            if k < self.num_layers - 1 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, True)
        return x, h_n, c_n

    def forward(self, input, hx=None):
        packed = isinstance(input, PackedSequence)
        lengths = None
        if packed:
            x, lengths = pad_packed_sequence(input)  # (time, batch, features), batch in the caller's order
            lengths = lengths.to(x.device)
        else:
            x = input
            if x.dim() not in (2, 3):
                raise ValueError(f"{type(self).__name__} expects a 2-D (unbatched) or 3-D input, got shape {tuple(x.shape)}")
        unbatched = not packed and x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)
            hx = None if hx is None else (tuple(t.unsqueeze(1) for t in hx) if isinstance(hx, tuple) else hx.unsqueeze(1))
        elif self.batch_first and not packed:
            x = x.transpose(0, 1)
        if x.shape[-1] != self.input_size:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[-1]} features, the layer expects {self.input_size}")
        h0, c0 = self._initial(hx, x.shape[1], x.dtype, x.device)
        self._observed = {}
        exact = self._exact_requant is not None
        x, h_n, c_n = self.run_layers(exact_input(self, x) if exact else x, h0, c0, lengths, exact)
        self._flush_observed()
        if exact:  # back to the values the float sim passes on (dequantized, float32)
            x = self._grid(f"l{self.num_layers - 1}.h").dequantize(x)
            h_n = [self._grid(s).dequantize(t) for s, t in zip(self.state_tensors("h"), h_n)]
            c_n = [self._grid(s).dequantize(t) for s, t in zip(self.state_tensors("c"), c_n)] if self.mode == "LSTM" else c_n
        h_n = torch.stack(h_n)
        c_n = torch.stack(c_n) if self.mode == "LSTM" else None
        if packed:
            out = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
        elif unbatched:
            out, h_n = x.squeeze(1), h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        else:
            out = x.transpose(0, 1) if self.batch_first else x
        return (out, (h_n, c_n)) if self.mode == "LSTM" else (out, h_n)


def grid_of(q, what: str) -> Grid:
    """The :class:`~edgequant.core.lut.Grid` of a calibrated per-tensor quantizer (``what`` names it in errors)."""
    if not isinstance(q, Quantizer) or not q.is_initialized:
        raise ValueError(f"integer-exact recurrent layers need every tensor quantized and calibrated: {what} is not")
    if not isinstance(q.spec.granularity, PerTensor):
        raise ValueError(f"{q.tensor_name}: integer-exact recurrent layers need per-tensor grids")
    return Grid(*q.scalar_grid(), q.qmin, q.qmax)


def _int_matmul(m, weight: str, bias: Optional[str], src: Grid) -> IntMatmul:
    q = m.param_quantizers[weight] if weight in m.param_quantizers else None
    if not isinstance(q, Quantizer) or not q.spec.symmetric or not isinstance(q.spec.granularity, (PerTensor, PerChannel)):
        raise ValueError(f"{weight}: integer-exact recurrent layers need a symmetric per-tensor or per-row weight quantizer")
    w = getattr(m, weight).detach()
    w_int = quantize(w, q.scale.detach(), q.zero_point, q.qmin, q.qmax, q.spec.granularity).long()
    s_b = bias_scale(torch.tensor(src.scale, dtype=torch.float64), q.scale.detach(), w.shape[0]).to(w.device)
    b = getattr(m, bias) if bias is not None and m.bias else None
    b_int = bias_integers(b, s_b) if b is not None else torch.zeros(w.shape[0], dtype=torch.int64, device=w.device)
    return IntMatmul(w_int, b_int, s_b.float(), src.zero_point, f"{weight}")


@dataclass
class ExactCell:
    ih: IntMatmul
    step: Callable
    grids: CellGrids


def cell_grids(m, k: int, d: str) -> CellGrids:
    """Grids and lookup tables of layer ``k``, direction ``d`` (see :mod:`edgequant.core.recurrent`)."""
    p, mode = f"l{k}{d}", m.mode
    names = {"LSTM": ["i_pre", "f_pre", "g_pre", "o_pre", "i", "f", "g", "o", "c", "tanh_c"] + (["m"] if m.proj_size > 0 else []),
             "GRU": ["r_pre", "z_pre", "r", "z", "hn", "rhn", "n_pre", "n"]}.get(mode, [])
    grids = {n: m._grid(f"{p}.{n}") for n in names}
    grids["h"] = m._grid(f"l{k}.h")
    dev = next(m.parameters()).device
    if mode == "LSTM":
        fns = {"i": torch.sigmoid, "f": torch.sigmoid, "g": torch.tanh, "o": torch.sigmoid}
        tables = {g: table(fn, grids[f"{g}_pre"], grids[g], dev) for g, fn in fns.items()}
        tables["tanh_c"] = table(torch.tanh, grids["c"], grids["tanh_c"], dev)
    elif mode == "GRU":
        tables = {g: table(fn, grids[f"{g}_pre"], grids[g], dev) for g, fn in (("r", torch.sigmoid), ("z", torch.sigmoid), ("n", torch.tanh))}
    else:
        grids["h_pre"] = m._grid(f"{p}.pre")
        tables = {"h": table(torch.tanh if mode == "RNN_TANH" else torch.relu, grids["h_pre"], grids["h"], dev)}
    return CellGrids(grids, tables)


def exact_cell(m, k: int, d: str) -> ExactCell:
    """The integer cell of layer ``k``, direction ``d`` of a quantized recurrent layer ``m``."""
    if m._exact_requant != "float32":
        raise ValueError(f"recurrent layers are integer-exact for requant='float32' (ONNX Runtime's arithmetic), "
                         f"not {m._exact_requant!r}")
    g = cell_grids(m, k, d)
    src = m._grid(f"l{k - 1}.h") if k > 0 else _input_grid(m)
    ih = _int_matmul(m, f"weight_ih_l{k}{d}", f"bias_ih_l{k}{d}", src)
    hh = _int_matmul(m, f"weight_hh_l{k}{d}", f"bias_hh_l{k}{d}", g.grids["h"])
    if m.mode == "LSTM":
        proj = _int_matmul(m, f"weight_hr_l{k}{d}", None, g.grids["m"]) if m.proj_size > 0 else None
        return ExactCell(ih, lambda px, h, c: lstm_step(px, h, c, hh, g, proj), g)
    if m.mode == "GRU":
        return ExactCell(ih, lambda px, h, c: (gru_step(px, h, hh, g), None), g)
    return ExactCell(ih, lambda px, h, c: (rnn_step(px, h, hh, g), None), g)


def _input_grid(m) -> Grid:
    q = m._in_quantizer(0)
    return grid_of(q, f"the input of {float_class_of(type(m)).__name__} (no quantizer before it)")


def exact_input(m, x: torch.Tensor) -> torch.Tensor:
    """The integers of the layer's input (its values are on the input quantizer's grid)."""
    return _input_grid(m).quantize(x)


def convert_recurrent(module: nn.RNNBase, param_quantizers: dict, tensor_quantizers: dict) -> nn.Module:
    """Turn an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` into its quantized twin in place."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    module.__class__ = quantized_class(type(module), QuantizedRecurrentMixin)
    module.param_quantizers = nn.ModuleDict(param_quantizers).to(device)
    module.tensor_quantizers = nn.ModuleDict({tensor_key(s): q for s, q in tensor_quantizers.items()}).to(device)
    return module


for _cls in (nn.LSTM, nn.GRU, nn.RNN):
    register_quantized(_cls, params=rnn_params, convert=convert_recurrent, tensors=rnn_tensors)
