"""The quantization formula, written once.

For a float tensor ``x``, a positive ``scale`` and an integer ``zero_point`` on the integer grid
``[qmin, qmax]``::

    q     = clamp(round(x / scale) + zero_point, qmin, qmax)      # quantize
    x_hat = (q - zero_point) * scale                              # dequantize
    fake_quantize(x) = dequantize(quantize(x))

``round`` is round-half-to-even, as in ONNX QuantizeLinear and ``torch.round``. Every other module
of edgequant calls these functions; none re-writes the formula.
"""
from __future__ import annotations

import torch

from .granularity import Granularity, PerTensor, expand_param

#: smallest scale handed out by :func:`choose_qparams`; keeps all-zero and constant tensors finite.
MIN_SCALE = 1e-10


def qrange(bits: int, signed: bool, narrow_range: bool = False) -> tuple[int, int]:
    """Integer grid ``(qmin, qmax)`` for ``bits`` (2..16).

    >>> qrange(8, signed=True), qrange(8, signed=False), qrange(8, True, narrow_range=True)
    ((-128, 127), (0, 255), (-127, 127))
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an int from 2 to 16, got {bits!r}")
    if signed:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return (qmin + 1 if narrow_range else qmin), qmax
    if narrow_range:
        raise ValueError("narrow_range applies to signed grids only (it drops the code -2**(bits-1))")
    return 0, 2**bits - 1


def choose_qparams(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    qmin: int,
    qmax: int,
    symmetric: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map ``[min_val, max_val]`` onto ``[qmin, qmax]``.

    The range is first widened to contain 0, so zero is exactly representable (``x = 0`` gives
    ``q = zero_point``). Elementwise over ``min_val``/``max_val`` (any shape).

    * symmetric: ``zero_point`` is 0 on a signed grid and ``qmin`` (= 0) on an unsigned one;
      ``scale = max(|min|, |max|) / qmax`` (signed) or ``max / qmax`` (unsigned: negatives clip to 0).
    * asymmetric: ``scale = (max - min) / (qmax - qmin)``,
      ``zero_point = clamp(qmin - round(min / scale), qmin, qmax)``.

    ``scale`` is at least :data:`MIN_SCALE`, so an all-zero range still gives finite numbers.

    >>> s, z = choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), 0, 255, symmetric=False)
    >>> round(s.item() * 255, 6), z.item()
    (4.0, 64)
    """
    min_val = torch.as_tensor(min_val, dtype=torch.float32) if not torch.is_tensor(min_val) else min_val
    max_val = torch.as_tensor(max_val, dtype=min_val.dtype) if not torch.is_tensor(max_val) else max_val
    if not (torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
        raise ValueError("cannot choose quantization parameters for a range that is not finite (NaN or Inf seen)")
    return _qparams(min_val, max_val, qmin, qmax, symmetric)


def _qparams(min_val, max_val, qmin, qmax, symmetric):
    """:func:`choose_qparams` without input checks (for inner loops of range searches)."""
    min_val, max_val = min_val.clamp(max=0), max_val.clamp(min=0)
    if symmetric:
        if qmin < 0:
            absmax = torch.maximum(-min_val, max_val)
            scale = absmax / qmax
            zero_point = torch.zeros_like(scale)
        else:
            scale = max_val / qmax
            zero_point = torch.full_like(scale, qmin)
        scale = scale.clamp(min=MIN_SCALE)
    else:
        scale = ((max_val - min_val) / (qmax - qmin)).clamp(min=MIN_SCALE)
        zero_point = torch.clamp(qmin - torch.round(min_val / scale), qmin, qmax)
    return scale, zero_point.to(torch.int32)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    granularity: Granularity = PerTensor(),
) -> torch.Tensor:
    """``clamp(round(x / scale) + zero_point, qmin, qmax)`` as an int32 tensor.

    >>> quantize(torch.tensor([-1.0, 0.0, 0.26, 9.0]), torch.tensor(0.5), torch.tensor(3), 0, 15)
    tensor([ 1,  3,  4, 15], dtype=torch.int32)
    """
    s = expand_param(scale, x.shape, granularity)
    z = expand_param(zero_point, x.shape, granularity).to(x.dtype)
    q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
    return q.to(torch.int32)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    granularity: Granularity = PerTensor(),
) -> torch.Tensor:
    """``(q - zero_point) * scale`` in the dtype of ``scale``."""
    s = expand_param(scale, q.shape, granularity)
    z = expand_param(zero_point, q.shape, granularity)
    return (q.to(s.dtype) - z.to(s.dtype)) * s


def _fake_quantize_impl(x, s, z, qmin, qmax, need_mask):
    # clamp(round(x/s) + z, qmin, qmax) - z == clamp(round(x/s), qmin - z, qmax - z) exactly, since z
    # is an integer added after rounding; this form needs 4 passes over memory instead of 6.
    r = torch.div(x, s).round_()
    lo, hi = qmin - z, qmax - z
    mask = ((r >= lo) & (r <= hi)) if need_mask else None
    if torch.is_tensor(lo):
        r = torch.clamp(r, lo, hi)
    else:
        r.clamp_(lo, hi)
    return r.mul_(s), mask


class _FakeQuantizeSTE(torch.autograd.Function):
    """Straight-through estimator: d x_hat / d x = 1 where x is inside the grid, 0 where it clips."""

    @staticmethod
    def forward(ctx, x, s, z, qmin, qmax):
        out, mask = _fake_quantize_impl(x, s, z, qmin, qmax, need_mask=True)
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    granularity: Granularity = PerTensor(),
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in float, with a straight-through gradient for ``x``.

    Bit-exact with ``dequantize(quantize(x, ...), ...)``; the gradient passes unchanged where
    ``round(x / scale) + zero_point`` lies in ``[qmin, qmax]`` and is zero where it is clipped.

    >>> fake_quantize(torch.tensor([-1.0, 0.0, 0.26, 9.0]), torch.tensor(0.5), torch.tensor(3), 0, 15)
    tensor([-1.0000,  0.0000,  0.5000,  6.0000])
    """
    s = expand_param(scale, x.shape, granularity).to(x.dtype)
    z = expand_param(zero_point, x.shape, granularity)
    if z.dim() == 0:
        z = int(z)  # a Python int keeps the clamp bounds scalar (faster, in place)
    else:
        z = z.to(x.dtype)
    if x.requires_grad and torch.is_grad_enabled():
        return _FakeQuantizeSTE.apply(x, s, z, qmin, qmax)
    out, _ = _fake_quantize_impl(x, s, z, qmin, qmax, need_mask=False)
    return out
