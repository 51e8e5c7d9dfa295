r"""Requantization: how an integer kernel turns an exact accumulator into the next 8-bit value.

Two targets, written once and used by both the sim's integer-exact mode
(:meth:`edgequant.QuantSim.integer_exact`) and the integer engine
(:class:`edgequant.export.integer.IntegerEngine`):

``"float32"`` -- what ONNX Runtime's CPU kernels (MLAS) compute on x86:

* conv / matmul: ``M = fp32(fp32(s_x * s_w) / s_y)`` per output channel, then
  ``q = clamp(rne(fp32(fp32(acc) * M)), qmin - z_y, qmax - z_y) + z_y``;
* add: ``r_a = fp32(s_a / s_c)``, ``r_b = fp32(s_b / s_c)``,
  ``f = fp32(z_c - fma(r_a, z_a, fp32(r_b z_b)))``, ``q = rne(fma(q_a, r_a, fma(q_b, r_b, f)))``, saturated;
* global average pool: ``acc = sum(q_x) - z_x N``, ``M = fp32(s_x / fp32(s_y N))``, then as conv;
* mul (``QLinearMul``): ``p = (q_a - z_a)(q_b - z_b)`` exactly, ``M = fp32(fp32(s_a s_b) / s_c)``, then
  ``q = rne(fp32(fp32(p * M) + z_c))`` with the zero points as stored (the zero point is added in float
  before rounding, unlike conv's), saturated.

``"fixed_point"`` -- gemmlowp/TFLite: ``M = M_0 2^{-n}`` with a 31-bit ``M_0``, an exact integer
product and a rounding right shift (half to even here, as ONNX rounds; gemmlowp rounds half away
from zero). Add brings both inputs to a common scale with 20 bits of headroom first.

The two differ where ``acc * M`` lies within about ``1e-7`` (relative) of a rounding boundary; each
is bit-exact with itself. ``rne`` is round half to even.
"""
from __future__ import annotations

import math

import torch

from ..errors import RequantError
from .quant import INT32_MIN

MODES = ("float32", "fixed_point")
ADD_HEADROOM_BITS = 20  # TFLite's left shift before the add's rescaling


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"requant must be one of {MODES}, got {mode!r}")
    return mode


def _f32(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64).to(torch.float32)


def wrap_int32(acc: torch.Tensor) -> torch.Tensor:
    """An int64 accumulator as an int32 register holds it: wrapped around modulo 2**32 (what the kernels' int32 adds
    do when a saturated bias and a large sum overflow)."""
    return (acc - INT32_MIN) % 2 ** 32 + INT32_MIN


def rne_f32_product(acc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``rne(fp32(fp32(acc) * m))`` as int64 (``m`` float32)."""
    return torch.round(acc.to(torch.float32) * m.to(torch.float32)).long()


def quantize_multiplier(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M0, n)`` int64 per element with ``m ~= M0 * 2**-n``, ``M0`` in ``[2**30, 2**31)``.

    >>> quantize_multiplier(torch.tensor([0.75]))
    (tensor([1610612736]), tensor([31]))
    """
    m0, n = [], []
    for v in m.double().flatten().tolist():
        if not v > 0 or not math.isfinite(v):
            raise RequantError(f"requantization multiplier must be positive and finite, got {v}")
        f, e = math.frexp(v)  # v = f * 2**e, f in [0.5, 1)
        q = round(f * 2 ** 31)
        if q == 2 ** 31:
            q, e = q // 2, e + 1
        shift = 31 - e
        if not 0 < shift < 62:
            raise RequantError(f"requantization multiplier {v:.3g} is out of the fixed-point range")
        m0.append(q)
        n.append(shift)
    return torch.tensor(m0, dtype=torch.int64).view(m.shape), torch.tensor(n, dtype=torch.int64).view(m.shape)


def shift_round(acc: torch.Tensor, m0: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``acc * M0 / 2**n`` rounded half to even, in int64 (``acc`` within int32, so ``acc * M0 < 2**62``).

    Half to even, like ONNX ``QuantizeLinear`` (gemmlowp rounds half away from zero; on an add whose
    output scale is twice the inputs' that turns every tie into a mismatch)."""
    p = acc * m0
    half = torch.ones_like(n) << (n - 1)
    q = (p + half) >> n
    tie = (p & ((half << 1) - 1)) == half
    return q - (tie & (q & 1).bool()).long()


def requantize(acc: torch.Tensor, s_x: float, s_w: torch.Tensor, s_y: float, z_y: int, lo, hi, mode: str,
               shape=None) -> torch.Tensor:
    """Requantize an int64 accumulator on the grid ``s_x * s_w[c]`` to ``(s_y, z_y)``, clamped to ``[lo, hi]``.

    ``s_w`` holds one scale per output channel (or one); ``shape`` views per-channel values so they
    broadcast against ``acc`` (``[1, -1, 1, 1]`` for NCHW conv outputs). ``lo``/``hi`` are integers or
    broadcastable int64 tensors on the output grid.
    """
    s_w = torch.as_tensor(s_w, dtype=torch.float64).reshape(-1)
    if mode == "float32":
        m = (_f32(s_x) * _f32(s_w)) / _f32(s_y)  # float32 arithmetic, in ORT's order
        m = m.view(shape) if shape is not None else m
        y = rne_f32_product(acc, m)
    else:
        m0, n = quantize_multiplier(s_x * s_w / s_y)
        if shape is not None:
            m0, n = m0.view(shape), n.view(shape)
        y = shift_round(acc, m0, n)
    y = y + z_y
    return torch.maximum(torch.minimum(y, torch.as_tensor(hi)), torch.as_tensor(lo))


def rescale(q: torch.Tensor, s_x: float, z_x: int, s_y: float, z_y: int, qmin: int, qmax: int, mode: str) -> torch.Tensor:
    """Move integers from grid ``(s_x, z_x)`` to ``(s_y, z_y)``."""
    if s_x == s_y and z_x == z_y:
        return q.clamp(qmin, qmax)
    return requantize(q - z_x, s_x, torch.ones(1, dtype=torch.float64), s_y, z_y, qmin, qmax, mode)


def add(qa: torch.Tensor, s_a: float, z_a: int, qb: torch.Tensor, s_b: float, z_b: int,
        s_y: float, z_y: int, lo, hi, mode: str, offsets: tuple[int, int, int] = (0, 0, 0)) -> torch.Tensor:
    """Quantized ``a + b`` on the output grid ``(s_y, z_y)``, clamped to ``[lo, hi]`` (int64).

    ``offsets`` are the :func:`~edgequant.core.quant.storage_offset` of a, b and the output: the float32 scheme computes
    with the zero points as stored, and ``fp32(z_y - (r_a z_a + r_b z_b))`` rounds differently when
    they move by 128 (measured: 7e-4 of MobileNetV2's ``features.6.add`` outputs flip without it).
    """
    if mode == "float32":
        oa, ob, oy = offsets
        qa, z_a, qb, z_b, z_y = qa + oa, z_a + oa, qb + ob, z_b + ob, z_y + oy
        r_a, r_b = _f32(s_a) / _f32(s_y), _f32(s_b) / _f32(s_y)
        # ORT's compiler contracts r_a z_a + r_b z_b into fma(r_a, z_a, r_b z_b) (measured: the plain
        # form flips 4e-7 of MobileNetV2's features.3.add outputs)
        fixed = _f32(z_y) - (r_a.double() * z_a + (r_b * _f32(z_b)).double()).to(torch.float32)
        # fma in float32: the float64 product of a small integer and a float32 is exact and the sum
        # below carries far fewer than 53 significant bits, so one rounding to float32 follows
        t = (qb.double() * r_b.double() + fixed.double()).to(torch.float32)
        t = (qa.double() * r_a.double() + t.double()).to(torch.float32)
        y = torch.round(t).long() - oy
    else:
        left = ADD_HEADROOM_BITS
        twice_max = 2 * max(s_a, s_b)
        ma0, ma_n = quantize_multiplier(torch.tensor([s_a / twice_max]))
        mb0, mb_n = quantize_multiplier(torch.tensor([s_b / twice_max]))
        ra = shift_round((qa - z_a) << left, ma0, ma_n)
        rb = shift_round((qb - z_b) << left, mb0, mb_n)
        mo0, mo_n = quantize_multiplier(torch.tensor([twice_max / ((1 << left) * s_y)]))
        y = shift_round(ra + rb, mo0, mo_n) + z_y
    return torch.maximum(torch.minimum(y, torch.as_tensor(hi)), torch.as_tensor(lo))


def mul(qa: torch.Tensor, s_a: float, z_a: int, qb: torch.Tensor, s_b: float, z_b: int,
        s_y: float, z_y: int, lo, hi, mode: str, offsets: tuple[int, int, int] = (0, 0, 0)) -> torch.Tensor:
    """Quantized ``a * b`` (broadcasting) on the output grid ``(s_y, z_y)``, clamped to ``[lo, hi]`` (int64).

    ``"float32"`` is ONNX Runtime's x86 ``QLinearMul`` (MLAS): the exact product of the centred integers
    times ``fp32(fp32(s_a s_b) / s_y)``, plus the output zero point *as stored* (``offsets``: the
    :func:`~edgequant.core.quant.storage_offset` of a, b and the output) in float32, then rounded half to
    even. ``"fixed_point"``: TFLite's multiplier and shift on the exact product.

    >>> mul(torch.tensor([3]), 0.5, 0, torch.tensor([5]), 0.25, 0, 0.25, 0, -128, 127, "float32")
    tensor([8])
    """
    acc = (qa - z_a) * (qb - z_b)  # the centred integers do not depend on the storage offset
    if mode == "float32":
        oy = offsets[2]
        m = (_f32(s_a) * _f32(s_b)) / _f32(s_y)
        t = (acc.to(torch.float32) * m) + _f32(z_y + oy)  # two float32 roundings, as MLAS computes
        y = torch.round(t).long() - oy
    else:
        m0, n = quantize_multiplier(torch.tensor([s_a * s_b / s_y]))
        y = shift_round(acc, m0, n) + z_y
    return torch.maximum(torch.minimum(y, torch.as_tensor(hi)), torch.as_tensor(lo))


def mean(acc: torch.Tensor, count: int, s_x: float, s_y: float, z_y: int, qmin: int, qmax: int, mode: str) -> torch.Tensor:
    """Average pooling: ``acc`` is the integer sum of ``count`` values minus ``z_x * count``."""
    if mode == "float32":
        m = _f32(s_x) / (_f32(s_y) * _f32(float(count)))
        y = rne_f32_product(acc, m)
    else:
        m0, n = quantize_multiplier(torch.tensor([s_x / (s_y * count)]))
        y = shift_round(acc, m0, n)
    return (y + z_y).clamp(qmin, qmax)
