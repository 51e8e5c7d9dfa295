"""Range methods: turn observer statistics into ``(scale, zero_point)``.

============= ===================== =====================================================================
method        observer              chooses the clipping range ``[lo, hi]`` as
============= ===================== =====================================================================
minmax        MinMaxObserver        the observed minimum and maximum
ema           MovingAverage...      the moving averages of per-batch minima and maxima
mean_minmax   MeanMinMaxObserver    the means over samples of each sample's minimum and maximum
median_minmax MedianMinMaxObserver  their medians (``act_eq``'s equalized depthwise inputs use it)
percentile    HistogramObserver     the ``(100 - p)``-th and ``p``-th percentiles (p = ``percentile``)
mse           HistogramObserver     the candidate that minimizes expected squared error
sqnr          HistogramObserver     like mse with clipping error weighted by ``gamma`` (3 by default), as
                                    AIMET's SQNR ("tf_enhanced") analyzer does: clipped outliers hurt
                                    more than rounding noise
============= ===================== =====================================================================

The expected error of a candidate grid with step ``s`` and edges ``[e_lo, e_hi]`` over a histogram with
counts ``n_b`` at bin centres ``c_b`` is::

    E = sum_b n_b * ( s**2 / 12                          if e_lo <= c_b <= e_hi   (rounding noise)
                      gamma * (c_b - clamp(c_b))**2      otherwise )              (clipping noise)
        - n_zero * s**2 / 12                             (exact zeros, e.g. after ReLU, are on the grid)

Symmetric grids search ``hi = alpha * absmax`` over ``alpha`` (100 linear steps plus 40 log steps down to
1e-4 for heavy tails); asymmetric grids search both ends on a 34 x 34 grid of such fractions.
"""
from __future__ import annotations

import torch

from ..core.granularity import Granularity, PerTensor
from ..core.quant import _qparams, choose_qparams, grid_range
from .stats import (HistogramObserver, MeanMinMaxObserver, MedianMinMaxObserver, MinMaxObserver, MovingAverageMinMaxObserver,
                    TensorObserver)

RANGE_METHODS = ("minmax", "ema", "mean_minmax", "median_minmax", "percentile", "mse", "sqnr")


def make_observer(method: str, granularity: Granularity = PerTensor(), name: str = "tensor", bins: int = 2048,
                  exact: bool = False):
    """The observer that ``method`` needs; ``exact=True`` keeps the values of a one-shot tensor (weights)
    so that percentile/mse/sqnr are computed on them exactly rather than on a histogram."""
    if exact and method in ("percentile", "mse", "sqnr"):
        return TensorObserver(granularity, name)
    if method == "minmax" or (exact and method in ("mean_minmax", "median_minmax")):  # a one-shot tensor is one sample
        return MinMaxObserver(granularity, name)
    if method == "mean_minmax":
        return MeanMinMaxObserver(granularity, name)
    if method == "median_minmax":
        return MedianMinMaxObserver(granularity, name)
    if method == "ema":
        return MovingAverageMinMaxObserver(granularity, name)
    if method in ("percentile", "mse", "sqnr"):
        return HistogramObserver(granularity, name, bins=bins)
    raise ValueError(f"unknown range method {method!r}; choose one of {RANGE_METHODS}")


def choose_range(observer, method: str, qmin: int, qmax: int, symmetric: bool,
                 percentile: float = 99.99, gamma: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group clipping range ``(lo, hi)`` from ``observer`` by ``method``."""
    if observer.empty:
        raise RuntimeError(f"{observer.name}: no data was observed, so no range can be chosen")
    if method in ("minmax", "ema", "mean_minmax", "median_minmax"):
        return observer.min, observer.max
    if not isinstance(observer, (HistogramObserver, TensorObserver)):
        raise TypeError(f"range method {method!r} needs a HistogramObserver or TensorObserver, got {type(observer).__name__}")
    if method == "percentile":
        if isinstance(observer, TensorObserver):
            q = torch.tensor([1 - percentile / 100.0, percentile / 100.0], device=observer.values.device)
            lo, hi = torch.quantile(observer.values, q, dim=1)
            return lo, hi
        return _percentile_range(observer, percentile)
    if method in ("mse", "sqnr"):
        g = 1.0 if method == "mse" else gamma
        if isinstance(observer, TensorObserver):
            return _search_range(observer.values.double(), None, observer.min, observer.max, qmin, qmax, symmetric, g)
        return _search_range(observer.bin_centers(), observer.hist, observer.min, observer.max, qmin, qmax, symmetric, g,
                             zeros=observer.zeros)
    raise ValueError(f"unknown range method {method!r}; choose one of {RANGE_METHODS}")


def compute_qparams(observer, method: str, qmin: int, qmax: int, symmetric: bool, **kw):
    """``(scale, zero_point)`` per group, from ``observer`` by ``method`` (see :func:`choose_range`)."""
    lo, hi = choose_range(observer, method, qmin, qmax, symmetric, **kw)
    return choose_qparams(lo, hi, qmin, qmax, symmetric)


def _percentile_range(obs: HistogramObserver, p: float):
    if not 50.0 < p <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {p}")
    if p == 100.0:
        return obs.min, obs.max
    cdf = obs.hist.cumsum(dim=1)
    total = cdf[:, -1:]
    frac = cdf / total  # (G, B)
    centers = obs.bin_centers()
    w = (obs.hi - obs.lo).double()[:, None] / obs.bins
    # hi: right edge of the first bin where the CDF reaches p; lo: left edge of the first bin past 1-p
    i_hi = (frac < p / 100.0).sum(dim=1, keepdim=True).clamp(max=obs.bins - 1)
    i_lo = (frac <= 1 - p / 100.0).sum(dim=1, keepdim=True).clamp(max=obs.bins - 1)
    hi = (centers.gather(1, i_hi) + w / 2).squeeze(1).float()
    lo = (centers.gather(1, i_lo) - w / 2).squeeze(1).float()
    return torch.maximum(lo, obs.min), torch.minimum(hi, obs.max)


def _search_range(centers, counts, mn, mx, qmin: int, qmax: int, symmetric: bool, gamma: float,
                  n_candidates: int = 100, zeros=None):
    """Grid search of the clipping range. ``centers`` (G, B) are histogram bin centres with ``counts``
    (G, B), or the values themselves with ``counts=None`` -- then the rounding error is exact."""
    mn, mx = mn.double().clamp(max=0), mx.double().clamp(min=0)

    def cost(lo, hi):  # lo, hi: (K, G) -> (K, G)
        s, z = _qparams(lo, hi, qmin, qmax, symmetric)
        s, z = s.double()[..., None], z.double()[..., None]  # (K, G, 1)
        c = centers[None]
        e_lo, e_hi = grid_range(s, z, qmin, qmax)
        clipped = torch.minimum(torch.maximum(c, e_lo), e_hi)
        clip = c - clipped
        if counts is None:  # exact: error of rounding the clipped value to the grid, plus weighted clipping
            rnd = clipped - torch.round(clipped / s) * s
            return (rnd * rnd + gamma * clip * clip).sum(dim=-1)
        err = torch.where(clip == 0, s * s / 12.0, gamma * clip * clip)
        total = (err * counts[None]).sum(dim=-1)
        if zeros is not None:  # exact zeros sit on the grid: no rounding noise for them
            total = total - zeros[None] * (s[..., 0] * s[..., 0] / 12.0)
        return total

    dev = centers.device
    if symmetric:
        # linear steps near the full range, log steps for heavy tails (clip far below the extreme)
        a = torch.cat([torch.logspace(-4, -2, 40, dtype=torch.float64, device=dev),
                       torch.linspace(1.0 / n_candidates, 1.0, n_candidates, dtype=torch.float64, device=dev)])
        absmax = torch.maximum(-mn, mx) if qmin < 0 else mx
        hi_c = a[:, None] * absmax[None]
        lo_c = -hi_c if qmin < 0 else torch.zeros_like(hi_c)
    else:  # coarse 2-D grid over both ends
        n_side = 24
        a = torch.cat([torch.logspace(-3, -1.4, 10, dtype=torch.float64, device=dev),
                       torch.linspace(1.0 / n_side, 1.0, n_side, dtype=torch.float64, device=dev)])
        a_lo, a_hi = torch.meshgrid(a, a, indexing="ij")
        lo_c = a_lo.reshape(-1)[:, None] * mn[None]
        hi_c = a_hi.reshape(-1)[:, None] * mx[None]
    chunk = max(1, (1 << 22) // max(1, centers.numel()))  # candidates per step, bounds memory to ~32 MB
    best_cost = best_lo = best_hi = None
    for k in range(0, lo_c.shape[0], chunk):
        c = cost(lo_c[k:k + chunk], hi_c[k:k + chunk])  # (k, G)
        cmin, arg = c.min(dim=0)
        lo_k = lo_c[k:k + chunk].gather(0, arg[None])[0]
        hi_k = hi_c[k:k + chunk].gather(0, arg[None])[0]
        if best_cost is None:
            best_cost, best_lo, best_hi = cmin, lo_k, hi_k
        else:
            better = cmin < best_cost
            best_cost = torch.where(better, cmin, best_cost)
            best_lo = torch.where(better, lo_k, best_lo)
            best_hi = torch.where(better, hi_k, best_hi)
    return best_lo.float(), best_hi.float()
