r"""The integer arithmetic of quantized LSTM / GRU / RNN cells, written once.

The sim's integer-exact mode, the integer engine and the ONNX export all compute a recurrent step this
way (the export writes the same operations as ONNX nodes), so the three agree bit for bit:

* **matmuls on integers**: ``acc = (q_x - z_x) W_q^T + b_q`` exactly (int32, bias on the grid
  ``s_x s_w``), then ``fp32(acc) * M`` with ``M = fp32(s_x s_w[row])`` -- ONNX ``MatMulInteger``, ``Add``,
  ``Cast``, ``Mul``; the two matmuls of a gate are added in float32 (``Add``);
* **quantize**: ``clamp(rne(v / s) + z, qmin, qmax)`` in float32 (ONNX ``QuantizeLinear``), dequantize
  ``fp32(q - z) * s`` (``DequantizeLinear``);
* **sigmoid and tanh as lookup tables** from the integer pre-activation to the integer activation
  (256 entries for 8-bit inputs, 65,536 for 16-bit ones; ONNX ``Gather``), as integer LSTM kernels
  do: a float ``Sigmoid`` in ONNX Runtime and ``torch.sigmoid`` differ in the last bit, a table does not;
* **elementwise products and sums** (``f c + i g``, ``o tanh(c)``, GRU's ``r hn`` and ``n + z (h - n)``)
  on dequantized values in float32, one rounding per operation (``Mul`` / ``Add`` / ``Sub``), then quantized.

The float sim differs only in the matmuls (float32 sums of products) and in calling sigmoid/tanh.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .lut import lookup
from .quant import INT32_MAX, INT32_MIN


@dataclass
class IntMatmul:
    """``fp32((q - zero_point) W^T + bias) * multiplier``: one weight matrix on integers.

    ``weight`` (N, K) and ``bias`` (N,) are integers (int64), ``multiplier`` (N,) float32 ``fp32(s_x s_w)``."""
    weight: torch.Tensor
    bias: torch.Tensor
    multiplier: torch.Tensor
    zero_point: int
    where: str = ""

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        # float64 products and sums of integers below 2**53 are exact (and run on every device)
        acc = torch.matmul((q - self.zero_point).double(), self.weight.double().t()).round().long() + self.bias
        lo, hi = int(acc.min()), int(acc.max())
        if lo < INT32_MIN or hi > INT32_MAX:
            raise OverflowError(f"{self.where}: int32 accumulator overflow (range {lo}..{hi})")
        return acc.float() * self.multiplier


@dataclass
class CellGrids:
    """The grids and tables of one layer and direction: ``grids[suffix]`` (``i_pre``, ``i``, ``c``, ``h``,
    ...) and ``tables[gate]`` (integers of the activation, indexed by pre-activation code)."""
    grids: dict
    tables: dict

    def act(self, gate: str, pre: torch.Tensor) -> torch.Tensor:
        """Quantize a gate's float pre-activation, then look its activation up."""
        src = self.grids[f"{gate}_pre"]
        return lookup(self.tables[gate], src.quantize(pre), src)

    def dq(self, name: str, q: torch.Tensor) -> torch.Tensor:
        return self.grids[name].dequantize(q)


def lstm_step(px: torch.Tensor, h: torch.Tensor, c: torch.Tensor, hh: IntMatmul, g: CellGrids,
              proj: Optional[IntMatmul] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step on integers: ``px`` is ``x``'s float32 gate projection (``IntMatmul`` output), ``h``
    and ``c`` the integer states; returns the new integer ``(h, c)``."""
    pre = px + hh(h)
    q = {k: g.act(k, p) for k, p in zip("ifgo", pre.chunk(4, -1))}
    c = g.grids["c"].quantize(g.dq("f", q["f"]) * g.dq("c", c) + g.dq("i", q["i"]) * g.dq("g", q["g"]))
    tc = lookup(g.tables["tanh_c"], c, g.grids["c"])
    m = g.dq("o", q["o"]) * g.dq("tanh_c", tc)
    if proj is None:
        return g.grids["h"].quantize(m), c
    return g.grids["h"].quantize(proj(g.grids["m"].quantize(m))), c


def gru_step(px: torch.Tensor, h: torch.Tensor, hh: IntMatmul, g: CellGrids) -> torch.Tensor:
    """One GRU step on integers (torch's formulation: ``n = tanh(x W_in + b_in + r (h W_hn + b_hn))``)."""
    xr, xz, xn = px.chunk(3, -1)
    hr, hz, hn = hh(h).chunk(3, -1)
    r, z = g.act("r", xr + hr), g.act("z", xz + hz)
    hn_q = g.grids["hn"].quantize(hn)
    rhn = g.grids["rhn"].quantize(g.dq("r", r) * g.dq("hn", hn_q))
    n = g.act("n", xn + g.dq("rhn", rhn))
    n_f = g.dq("n", n)
    return g.grids["h"].quantize(n_f + g.dq("z", z) * (g.dq("h", h) - n_f))


def rnn_step(px: torch.Tensor, h: torch.Tensor, hh: IntMatmul, g: CellGrids) -> torch.Tensor:
    """One plain RNN step on integers: the nonlinearity is the table from ``pre`` to ``h``."""
    return g.act("h", px + hh(h))
