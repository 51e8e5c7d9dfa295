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

from typing import Optional

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


def fill_empty_ranges(scale: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(scale, n_empty)``: groups whose range was empty (all zeros, so :func:`choose_qparams` gave
    them :data:`MIN_SCALE`) take the largest scale of the tensor, or 1.0 when every group is empty.

    Their values are all zero and stay exactly zero on any grid, but a scale of 1e-10 makes the bias
    grid ``s_in * s_w`` of a dead weight channel (a pruned channel) so fine that its int32 bias
    saturates: a bias of 0.8 became 0.0068, in the sim and in the deployed integer model alike.

    >>> fill_empty_ranges(torch.tensor([0.5, 1e-10, 0.25]))
    (tensor([0.5000, 0.5000, 0.2500]), 1)
    """
    empty = scale <= MIN_SCALE
    n = int(empty.sum())
    if n == 0:
        return scale, 0
    live = scale[~empty]
    fill = live.max() if live.numel() else torch.ones((), dtype=scale.dtype, device=scale.device)
    return torch.where(empty, fill, scale), n


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


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
             granularity: Granularity = PerTensor()) -> torch.Tensor:
    """``clamp(round(x / scale) + zero_point, qmin, qmax)`` as an int32 tensor.

    >>> quantize(torch.tensor([-1.0, 0.0, 0.26, 9.0]), torch.tensor(0.5), torch.tensor(3), 0, 15)
    tensor([ 1,  3,  4, 15], dtype=torch.int32)
    """
    s, z = _expanded(scale, zero_point, x.shape, granularity)
    q = torch.clamp(torch.round(x / s) + z.to(x.dtype), qmin, qmax)
    return q.to(torch.int32)


def quantize_sum_preserving(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                            granularity: Granularity = PerTensor(), group_from: int = 2) -> torch.Tensor:
    """Like :func:`quantize`, but the integers of each group -- the elements sharing the indices before
    dimension ``group_from`` (for a convolution weight ``(Cout, Cin, *kernel)``, one filter tap set) --
    sum as close as the grid allows to ``sum(x / s)``. A filter's sum is its response to a flat input
    (its DC gain), which nearest rounding misses by the sum of the taps' rounding errors; here the taps
    nearest a tie flip to their other neighbour until the sum is right, each tap staying within one
    step of its value. Every element of a group must share one scale.

    >>> w = torch.tensor([[0.4, 0.4, 0.4]])  # nearest: 0 0 0 (sum 0, the float sum is 1.2)
    >>> quantize_sum_preserving(w, torch.tensor(1.0), torch.tensor(0), -8, 7, group_from=1)
    tensor([[1, 0, 0]], dtype=torch.int32)
    """
    s, z = _expanded(scale, zero_point, x.shape, granularity)
    u = (x / s).reshape(*x.shape[:group_from], -1).flatten(0, group_from - 1)
    lo, hi = ((bound - z).expand_as(x).reshape(u.shape).to(u.dtype) for bound in (qmin, qmax))
    u = torch.clamp(u, lo, hi)
    n = torch.round(u)
    need = torch.round(u.sum(1, keepdim=True)) - n.sum(1, keepdim=True)  # taps to move up (> 0) or down (< 0)
    frac = u - n  # in [-0.5, 0.5]: the cost of moving up falls as frac rises
    for step, key, ok in ((1, frac, n + 1 <= hi), (-1, -frac, n - 1 >= lo)):
        key = torch.where(ok, key, torch.full_like(key, -float("inf")))
        rank = torch.argsort(key, dim=1, descending=True, stable=True).argsort(1)
        n = n + step * (ok & (rank < (step * need).clamp(min=0))).to(n.dtype)
    return (n.reshape(x.shape) + z.to(n.dtype)).to(torch.int32)


def _expanded(scale, zero_point, shape, granularity):
    """``scale`` and ``zero_point`` broadcastable against a tensor of ``shape``."""
    return expand_param(scale, shape, granularity), expand_param(zero_point, shape, granularity)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               granularity: Granularity = PerTensor()) -> torch.Tensor:
    """``(q - zero_point) * scale`` in the dtype of ``scale``."""
    s, z = _expanded(scale, zero_point, q.shape, granularity)
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
    rounding: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in float, with a straight-through gradient for ``x``.

    Bit-exact with ``dequantize(quantize(x, ...), ...)``; the gradient passes unchanged where
    ``round(x / scale) + zero_point`` lies in ``[qmin, qmax]`` and is zero where it is clipped.

    ``rounding`` replaces round-to-nearest by learned rounding (AdaRound): a tensor ``h`` shaped like
    ``x`` with values in ``[0, 1]``, and ``round(x / s)`` becomes ``floor(x / s) + h``::

        x_hat = s * (clamp(floor(x / s) + h + z, qmin, qmax) - z)

    The gradient then flows to ``h`` (and not to ``x``); ``h = round(x/s) - floor(x/s)`` is nearest rounding.

    >>> fake_quantize(torch.tensor([-1.0, 0.0, 0.26, 9.0]), torch.tensor(0.5), torch.tensor(3), 0, 15)
    tensor([-1.0000,  0.0000,  0.5000,  6.0000])
    >>> fake_quantize(torch.tensor([0.26, 0.26]), torch.tensor(0.5), torch.tensor(0), 0, 15, rounding=torch.tensor([0.0, 1.0]))
    tensor([0.0000, 0.5000])
    """
    s, z = _expanded(scale, zero_point, x.shape, granularity)
    s = s.to(x.dtype)
    if rounding is not None:
        z = z.to(x.dtype)
        return s * (torch.clamp(torch.floor(x / s) + rounding + z, qmin, qmax) - z)
    if z.dim() == 0:
        z = int(z)  # a Python int keeps the clamp bounds scalar (faster, in place)
    else:
        z = z.to(x.dtype)
    if x.requires_grad and torch.is_grad_enabled():
        return _FakeQuantizeSTE.apply(x, s, z, qmin, qmax)
    out, _ = _fake_quantize_impl(x, s, z, qmin, qmax, need_mask=False)
    return out


def grid_range(scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The float range ``[(qmin - z) s, (qmax - z) s]`` a grid represents (elementwise, any shape).

    >>> lo, hi = grid_range(torch.tensor(0.5), torch.tensor(3), 0, 15)
    >>> lo.item(), hi.item()
    (-1.5, 6.0)
    """
    z = torch.as_tensor(zero_point).to(torch.as_tensor(scale).dtype)
    return (qmin - z) * scale, (qmax - z) * scale


def storage_offset(bits: int, signed: bool) -> int:
    """What deployment adds to a grid's integers to store them: activation grids of at most 8 bits are
    stored as uint8 (ONNX Runtime fuses its integer kernels only on uint8 activations), so a signed
    grid moves by +128 -- ``(q, z)`` and ``(q + 128, z + 128)`` are the same grid. Wider grids are
    stored as they are. The ONNX export and the float32 requantization (which computes with the
    stored zero points) both take the shift from here.

    >>> storage_offset(8, True), storage_offset(5, True), storage_offset(8, False), storage_offset(16, True)
    (128, 128, 0, 0)
    """
    return 128 if signed and bits <= 8 else 0


#: int32, the accumulator (and bias) grid of integer kernels
INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1


def bias_scale(s_in, s_w: torch.Tensor, channels: int) -> torch.Tensor:
    """The bias grid ``s_in * s_w[c]`` of ``channels`` output channels, in float64.

    ``s_w`` has one scale or one per output channel (a transposed conv with groups has one per
    channel of a group: it repeats). The product is taken in float64 everywhere (sim, export,
    engine): a float32 product moved ties on 3e-5 of one MobileNetV2 layer's outputs.
    """
    s_w = torch.as_tensor(s_w).detach().reshape(-1).double()
    if s_w.numel() == 1:
        s_w = s_w.expand(channels)
    elif s_w.numel() != channels:
        s_w = s_w.repeat(channels // s_w.numel())
    s_in = s_in.detach().reshape(()).double() if torch.is_tensor(s_in) else torch.tensor(float(s_in), dtype=torch.float64)
    return s_in.to(s_w.device) * s_w


def bias_integers(bias: torch.Tensor, s_bias: torch.Tensor) -> torch.Tensor:
    """``clamp(round(b / s_bias), int32)`` as int64: the bias on the accumulator grid (see :func:`bias_scale`)."""
    b = bias.detach().double().to(s_bias.device)
    return torch.clamp(torch.round(b / s_bias), INT32_MIN, INT32_MAX).long()


def lsq_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    qmin: int,
    qmax: int,
    granularity: Granularity = PerTensor(),
    grad_scale: float = 1.0,
) -> torch.Tensor:
    r"""Fake quantization with a learnable scale (LSQ, Esser et al. 2020) and offset (LSQ+, Bhalgat et
    al. 2020): the value of :func:`fake_quantize` to the last bit, with gradients for all three inputs.

    ``offset`` is a float zero point; the grid uses ``z = clamp(round(offset), qmin, qmax)``, so the
    zero point is an integer at every step. With ``r = round(x / s)`` and ``g = grad_scale``:

    ==================  ===================  ====================  ===============
    where               d x_hat / d x        d x_hat / d s          d x_hat / d offset
    ==================  ===================  ====================  ===============
    inside the grid     1                    g (r - x / s)          0
    below ``qmin``      0                    g (qmin - z)           -s
    above ``qmax``      0                    g (qmax - z)           -s
    ==================  ===================  ====================  ===============

    LSQ's ``grad_scale`` is ``1 / sqrt(n qmax)``, ``n`` the number of values one scale covers (per
    sample, for activations). The gradients are summed to the shapes of ``scale`` and ``offset``.

    >>> s = torch.tensor(0.5, requires_grad=True)
    >>> y = lsq_fake_quantize(torch.tensor([0.26, 9.0]), s, torch.tensor(3.0), 0, 15)
    >>> y.tolist(), torch.autograd.grad(y.sum(), s)[0].item()  # (1 - 0.52) + (15 - 3)
    ([0.5, 6.0], 12.479999542236328)
    """
    s, z = _expanded(scale, offset, x.shape, granularity)
    return _LSQ.apply(x, s.to(x.dtype), z.to(x.dtype), qmin, qmax, float(grad_scale))


class _LSQ(torch.autograd.Function):
    """Saves ``x`` and the output (both kept by the neighbouring layers anyway) and finds the clipped
    values again in the backward pass, so that no mask is stored."""

    @staticmethod
    def forward(ctx, x, s, offset, qmin, qmax, g):
        z = torch.clamp(torch.round(offset), qmin, qmax)
        out = torch.div(x, s).round_()
        out = out.clamp_(qmin - z, qmax - z).mul_(s)  # the operations of fake_quantize: the same bits
        ctx.save_for_backward(x, out, s, z)
        ctx.grid = (qmin, qmax, g)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, out, s, z = ctx.saved_tensors
        qmin, qmax, g = ctx.grid
        # round(x / s) lies in [qmin - z, qmax - z] where x is within half a step of the grid's ends
        inside = x >= (qmin - z - 0.5) * s
        inside &= x <= (qmax - z + 0.5) * s
        gx = torch.where(inside, grad, 0.0)
        gs = go = None
        if ctx.needs_input_grad[1]:
            e = torch.where(inside, out - x, out)  # d out / d s, times s: (round(v) - v) inside, the bound outside
            gs = torch.dot(grad.reshape(-1), e.reshape(-1)).reshape(s.shape) if s.numel() == 1 else \
                (grad * e).sum_to_size(s.shape)
            gs = gs * (g / s)
        if ctx.needs_input_grad[2]:
            go = -s * (grad.sum_to_size(z.shape) - gx.sum_to_size(z.shape))
        return (gx if ctx.needs_input_grad[0] else None), gs, go, None, None, None
