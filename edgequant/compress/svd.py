r"""Low-rank factorizations of single layers: weight SVD and spatial SVD.

**Weight SVD** (``nn.Linear``, 1x1 ``nn.Conv2d``): ``W (out, in) ~ U_r S_r V_r^T`` becomes two layers,
``in -> r`` with weight ``sqrt(S_r) V_r^T`` and ``r -> out`` with weight ``U_r sqrt(S_r)`` and the bias;
MACs and parameters go from ``out * in`` to ``r (out + in)``.

**Spatial SVD** (``k_h x k_w`` ``nn.Conv2d``, groups 1): the kernel reshaped to a ``(C_in k_h) x (C_out k_w)``
matrix, ``W[c_in, i, c_out, j]``, is factored at rank ``r`` into a vertical ``k_h x 1`` conv ``C_in -> r``
(stride, padding and dilation along the height) and a horizontal ``1 x k_w`` conv ``r -> C_out`` (along the
width, with the bias) -- Jaderberg et al., "Speeding up convolutional neural networks with low rank
expansions", 2014; AIMET's spatial SVD. MACs per output pixel go from ``C_out C_in k_h k_w`` to about
``r (C_in k_h s_w + C_out k_w)`` (the vertical conv runs on ``s_w`` times as many columns, ``s_w`` the
horizontal stride).

Both keep the input and output shapes exactly; the factored layers are plain ``nn.Sequential`` of torch
layers, which QuantSim, PTQ, QAT and the export take like any others. Ranks may be rounded up to a
multiple the hardware prefers (``multiple``).

>>> import torch
>>> lin = torch.nn.Linear(64, 32)
>>> two = weight_svd(lin, 32)  # full rank: the same function
>>> x = torch.randn(4, 64)
>>> bool(torch.allclose(two(x), lin(x), atol=1e-5))
True
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _round_rank(rank: int, full: int, multiple: int) -> int:
    if multiple > 1:
        rank = int(math.ceil(rank / multiple) * multiple)
    return max(1, min(rank, full))


def svd_rank_limit(m: nn.Module) -> int:
    """The largest useful rank of a layer's factorization (its full rank)."""
    if isinstance(m, nn.Linear):
        return min(m.in_features, m.out_features)
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        if kh == kw == 1:
            return min(m.in_channels, m.out_channels)
        return min(m.in_channels * kh, m.out_channels * kw)
    raise TypeError(f"no SVD factorization for {type(m).__name__}")


def is_factorable(m: nn.Module) -> bool:
    """A plain Linear, or a plain ungrouped Conv2d with zero padding of explicit sizes (what the factorizations
    keep exactly); subclasses with their own forward are left alone."""
    if type(m) is nn.Linear:
        return True
    return type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)


def weight_svd(m: nn.Module, rank: int, multiple: int = 1, gram: torch.Tensor | None = None) -> nn.Sequential:
    """``m`` (Linear, or 1x1 Conv2d) as two layers of rank ``rank`` (rounded up to ``multiple``).

    ``gram``: the second moment ``E[x x^T]`` of the layer's inputs (``in x in``, see
    :func:`edgequant.compress.select.input_grams`). With it the factorization minimizes the error of the layer's
    *outputs* on such inputs, ``E||(W - W') x||^2``, instead of the weights' own error: the SVD of ``W L``
    (``L L^T = gram``, Cholesky), ``W' = [W L]_r L^-1`` -- the directions the inputs do not use are the ones given
    up (data-aware SVD as in ASVD / SVD-LLM)."""
    w = m.weight.detach().double()
    w2 = w.reshape(w.shape[0], -1)
    rank = _round_rank(rank, min(w2.shape), multiple)
    chol = None
    if gram is not None:
        g = gram.detach().double().to(w2.device)
        g = g + 1e-6 * g.diagonal().mean().clamp_min(1e-30) * torch.eye(len(g), dtype=g.dtype, device=g.device)
        chol, info = torch.linalg.cholesky_ex(g)
        if int(info) != 0:
            chol = None
    u, s, vh = torch.linalg.svd(w2 @ chol if chol is not None else w2, full_matrices=False)
    root = s[:rank].sqrt()
    first = root[:, None] * vh[:rank]
    if chol is not None:  # first @ L^-1: solve L^T first'^T = first^T
        first = torch.linalg.solve_triangular(chol.T, first.T, upper=True).T
    first = first.to(m.weight.dtype)
    second = (u[:, :rank] * root[None, :]).to(m.weight.dtype)
    bias = m.bias is not None
    if isinstance(m, nn.Linear):
        a, b = nn.Linear(m.in_features, rank, bias=False), nn.Linear(rank, m.out_features, bias=bias)
    else:
        a = nn.Conv2d(m.in_channels, rank, 1, stride=m.stride, padding=m.padding, bias=False)
        b = nn.Conv2d(rank, m.out_channels, 1, bias=bias)
        first, second = first[:, :, None, None], second[:, :, None, None]
    with torch.no_grad():
        a.weight.copy_(first)
        b.weight.copy_(second)
        if bias:
            b.bias.copy_(m.bias.detach())
    return nn.Sequential(a, b).to(m.weight.device).train(m.training)


def spatial_svd(m: nn.Conv2d, rank: int, multiple: int = 1) -> nn.Sequential:
    """A ``k_h x k_w`` conv as a ``k_h x 1`` conv to ``rank`` channels then a ``1 x k_w`` conv (see the module
    docstring); ``rank`` rounded up to ``multiple``."""
    if m.groups != 1:
        raise ValueError(f"spatial SVD needs an ungrouped conv, got groups={m.groups}")
    cout, cin, kh, kw = m.weight.shape
    w = m.weight.detach().double()
    mat = w.permute(1, 2, 0, 3).reshape(cin * kh, cout * kw)  # [c_in, i] x [c_out, j]
    rank = _round_rank(rank, min(mat.shape), multiple)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    root = s[:rank].sqrt()
    vert = (u[:, :rank] * root).reshape(cin, kh, rank).permute(2, 0, 1)[..., None]  # (r, c_in, k_h, 1)
    horiz = (root[:, None] * vh[:rank]).reshape(rank, cout, kw).permute(1, 0, 2)[:, :, None, :]  # (c_out, r, 1, k_w)
    (sh, sw), (ph, pw), (dh, dw) = m.stride, m.padding, m.dilation
    a = nn.Conv2d(cin, rank, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1), bias=False)
    b = nn.Conv2d(rank, cout, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw), bias=m.bias is not None)
    with torch.no_grad():
        a.weight.copy_(vert.to(m.weight.dtype))
        b.weight.copy_(horiz.to(m.weight.dtype))
        if m.bias is not None:
            b.bias.copy_(m.bias.detach())
    return nn.Sequential(a, b).to(m.weight.device).train(m.training)


def factorize(m: nn.Module, rank: int, multiple: int = 1, gram: torch.Tensor | None = None) -> nn.Sequential:
    """Weight SVD for a Linear or a 1x1 conv (data-aware with ``gram``), spatial SVD for a larger conv."""
    if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1):
        return spatial_svd(m, rank, multiple)
    return weight_svd(m, rank, multiple, gram)


def layer_input(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(positions, features)``: the input vectors a Linear (on any leading dims) or a 1x1 conv multiplies."""
    if isinstance(m, nn.Conv2d):
        sh, sw = m.stride
        return x[..., ::sh, ::sw].transpose(0, 1).reshape(x.shape[1], -1).T
    return x.reshape(-1, x.shape[-1])


def rank_for_ratio(m: nn.Module, ratio: float, multiple: int = 1) -> int:
    """The rank whose factorization keeps about ``ratio`` of the layer's MACs (per output pixel for convs;
    at least 1, at most the full rank)."""
    if isinstance(m, nn.Linear):
        per_rank, full = m.in_features + m.out_features, m.in_features * m.out_features
    else:
        cout, cin, kh, kw = m.weight.shape
        sw = m.stride[1]
        # the vertical conv runs on s_w times as many columns as the horizontal conv's output
        per_rank, full = cin * kh * sw + cout * kw, cout * cin * kh * kw
    return _round_rank(max(1, int(ratio * full / per_rank)), svd_rank_limit(m), multiple)
