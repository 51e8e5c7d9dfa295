"""Normalizations, softmax and L2 norms computed in float64 and rounded to float32 once.

A LayerNorm or softmax between two quantizers runs in ONNX Runtime as ``DequantizeLinear -> float op ->
QuantizeLinear``. ORT's float32 kernels sum in another order than torch's (vectorized), so on ~20% of the
elements the two differ in the last bit, and where such an element sits near a rounding boundary of the next
quantizer, the deployed integer lands one step from the sim's (Swin, ViT, ConvNeXt: the first difference of
an otherwise bit-identical model is at its first LayerNorm).

Computed in float64 the two libraries still differ, but by ~1e-16 relative: after the final rounding to
float32 (a step of ~1e-7 relative) both give the same float32 value unless the exact result lies within
~1e-16 of a float32 rounding boundary (about one element in a billion). The sums of a LayerNorm fed by a
quantizer are even exact: every value is ``s * integer``, a 33-bit product that float64 adds without
rounding in any order.

:class:`Float64Norms` is a ``TorchFunctionMode``: inside it, ``F.layer_norm``, ``F.group_norm`` and every
softmax form, the L2 norm of ``F.normalize`` (Swin v2's cosine attention), ``torch.einsum`` (a product in float,
as MViTv2's relative positions) and bilinear / bicubic resizes to an explicit size (:func:`resize`: segmentation heads,
CrossViT's second branch) compute this way. The sim's integer-exact mode runs its forward inside it; the ONNX export
traces the ops inside it, so the graph holds the same computation (``Cast`` to double, ``ReduceMean``,
``Sub``, ``Mul``, ``Sqrt``, ``Div``, ``Softmax`` in double, ``Cast`` back). The price is ORT time: a float64
LayerNorm of 600k elements takes 1.4 ms against 0.18 ms for ORT's float32 kernel (2 threads).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .attention import attention_softmax

_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}
_LOG_SOFTMAX = {F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax}
_NORMS = {torch.linalg.vector_norm, torch.Tensor.norm}
#: the resizes :class:`Float64Norms` computes as two float64 products with torch's own interpolation weights
RESIZES = {torch.ops.aten.upsample_bilinear2d.vec: "bilinear", torch.ops.aten.upsample_bicubic2d.vec: "bicubic"}
#: the functions (and tensor methods, by name, as fx records them) :class:`Float64Norms` computes in float64
FUNCTIONS = (F.layer_norm, F.group_norm, F.softmax, torch.softmax, F.log_softmax, torch.log_softmax, "softmax",
             "log_softmax", attention_softmax, torch.linalg.vector_norm, F.normalize, torch.einsum,
             F.interpolate) + tuple(RESIZES)


def _weights(n_in: int, n_out: int, mode: str, align_corners: bool) -> torch.Tensor:
    """``(n_out, n_in)`` float64 matrix of torch's own 1-D interpolation weights (a constant to the ONNX tracer)."""
    basis = torch.eye(n_in, dtype=torch.float64).reshape(n_in, 1, n_in, 1)
    w = F.interpolate(basis, size=(n_out, 1), mode=mode, align_corners=align_corners)[:, 0, :, 0].T
    return torch.from_numpy(w.detach().cpu().numpy().copy()).to(basis.device)


def resize(x: torch.Tensor, size, mode: str, align_corners: bool) -> torch.Tensor:
    """Bilinear / bicubic resize of ``(N, C, H, W)`` to ``size`` as ``A_h @ x @ A_w^T`` in float64, rounded once: the
    same weights as torch's kernel (it is separable), sums that ONNX Runtime's double ``MatMul`` reproduces (it has
    no double ``Resize``)."""
    (h, w), (oh, ow) = x.shape[-2:], size
    a_h = _weights(h, oh, mode, align_corners).to(x.device)
    a_w = _weights(w, ow, mode, align_corners).to(x.device)
    return torch.matmul(torch.matmul(a_h, x.double()), a_w.T).to(x.dtype)


def _resize_call(func, args, kwargs):
    """``(mode, size, align_corners)`` of a 4-D bilinear / bicubic resize to an explicit size without antialiasing,
    or None."""
    if func is F.interpolate:
        a = _bound(args, kwargs, ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor",
                                  "antialias"), {"size": None, "mode": "nearest", "align_corners": None, "antialias": False})
        mode, size, corners = a["mode"], a["size"], a["align_corners"]
    else:
        a = _bound(args, kwargs, ("input", "output_size", "align_corners", "scale_factors"), {"scale_factors": None})
        mode, size, corners = RESIZES[func], a["output_size"], a["align_corners"]
    if mode not in ("bilinear", "bicubic") or a.get("antialias") or size is None or a["input"].dim() != 4:
        return None
    size = tuple(int(v) for v in (size if isinstance(size, (list, tuple)) else (size, size)))
    return mode, size, bool(corners)


def layer_norm(x: torch.Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """``F.layer_norm`` in float64 (two-pass mean and variance, divided by ``sqrt(var + eps)``), rounded once."""
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    xd = x.double()
    d = xd - xd.mean(dims, keepdim=True)
    y = d / torch.sqrt((d * d).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


def group_norm(x: torch.Tensor, num_groups: int, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """``F.group_norm`` in float64, rounded once."""
    n, c = x.shape[:2]
    xd = x.double().reshape(n, num_groups, -1)
    d = xd - xd.mean(-1, keepdim=True)
    y = (d / torch.sqrt((d * d).mean(-1, keepdim=True) + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * weight.double().reshape(shape)
    if bias is not None:
        y = y + bias.double().reshape(shape)
    return y.to(x.dtype)


def _bound(args, kwargs, names, defaults):
    """The arguments of a call as a dict by ``names`` (positional first, then keywords, then ``defaults``)."""
    out = dict(defaults)
    out.update(zip(names, args))
    out.update(kwargs)
    return out


class Float64Norms(TorchFunctionMode):
    """Inside this mode, ``F.layer_norm``, ``F.group_norm``, softmax and log-softmax on float32 inputs compute in
    float64 and round to float32 once (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.einsum:  # a float product (MViTv2's relative positions): products exact, sums in float64
            operands = args[1:]
            if len(operands) == 1 and isinstance(operands[0], (list, tuple)):  # einsum(eq, [a, b])
                operands = tuple(operands[0])
            if args and isinstance(args[0], str) and operands and all(
                    isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in operands):
                return torch.einsum(args[0], *[t.double() for t in operands]).float()
            return func(*args, **kwargs)
        x = args[0] if args else kwargs.get("input")
        if not (isinstance(x, torch.Tensor) and x.dtype == torch.float32):
            return func(*args, **kwargs)
        if func is F.interpolate or func in RESIZES:
            found = _resize_call(func, args, kwargs)
            return func(*args, **kwargs) if found is None else resize(x, found[1], found[0], found[2])
        if func is F.layer_norm:
            a = _bound(args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"),
                       {"weight": None, "bias": None, "eps": 1e-5})
            return layer_norm(x, a["normalized_shape"], a["weight"], a["bias"], a["eps"])
        if func is F.group_norm:
            a = _bound(args, kwargs, ("input", "num_groups", "weight", "bias", "eps"),
                       {"weight": None, "bias": None, "eps": 1e-5})
            return group_norm(x, a["num_groups"], a["weight"], a["bias"], a["eps"])
        if func in _SOFTMAX or func in _LOG_SOFTMAX:
            a = _bound(args, kwargs, ("input", "dim"), {"dim": None})
            if a["dim"] is None or a.get("dtype") is not None:  # the legacy implicit dim, a dtype cast: as they are
                return func(*args, **kwargs)
            op = torch.softmax if func in _SOFTMAX else torch.log_softmax
            return op(x.double(), a["dim"]).to(x.dtype)
        if func is F.normalize:  # its norm as below, the division in float32 as F.normalize does it
            a = _bound(args, kwargs, ("input", "p", "dim", "eps", "out"), {"p": 2.0, "dim": 1, "eps": 1e-12, "out": None})
            if a["p"] != 2 or a["out"] is not None:
                return func(*args, **kwargs)
            norm = torch.linalg.vector_norm(x.double(), 2, a["dim"], True).to(x.dtype)
            return x / norm.clamp_min(a["eps"]).expand_as(x)
        if func in _NORMS:  # F.normalize's (and cosine attention's) L2 norm: the sum of squares in float64
            a = _bound(args, kwargs, ("input", "ord", "dim", "keepdim"), {"ord": 2, "dim": None, "keepdim": False})
            if func is torch.Tensor.norm:
                a = _bound(args, kwargs, ("input", "p", "dim", "keepdim"), {"p": "fro", "dim": None, "keepdim": False})
                a["ord"] = 2 if a["p"] in (2, "fro") and a["dim"] is not None else None
            if a["ord"] != 2 or a.get("dtype") is not None or a.get("out") is not None:
                return func(*args, **kwargs)
            return torch.linalg.vector_norm(x.double(), 2, a["dim"], a["keepdim"]).to(x.dtype)
        return func(*args, **kwargs)
