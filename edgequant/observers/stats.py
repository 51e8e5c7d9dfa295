"""Observers: collect statistics of a tensor across calibration batches.

An observer only accumulates (``update``) and combines (``merge``, e.g. across processes); turning
statistics into an encoding is the job of :mod:`edgequant.observers.ranges`. Statistics are kept per
group -- one group per (scale, zero_point) pair of the granularity (see
:func:`edgequant.core.granularity.to_groups`).
"""
from __future__ import annotations

import torch

from ..core.granularity import Granularity, PerTensor, to_groups


def _check_finite(x: torch.Tensor, name: str, lo=None, hi=None) -> None:
    """Raise if ``x`` has NaN/Inf. Given its per-group min/max (NaN and Inf propagate into them), only
    those are checked, which saves a pass over ``x``."""
    if lo is not None and bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        return
    if not torch.isfinite(x).all():
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(
            f"{name}: found {n_nan} NaN and {n_inf} Inf values during calibration; "
            "check the calibration data and the float model (run it on the same batch) before quantizing"
        )


def _grouped_range(x: torch.Tensor, granularity, name: str):
    """``(groups, min, max)`` of ``x`` per quantization group, checked finite; None for an empty tensor."""
    x = x.detach()
    if x.numel() == 0:
        return None
    g = to_groups(x.float(), granularity)
    lo, hi = group_aminmax(g)
    _check_finite(x, name, lo, hi)
    return g, lo, hi


def group_aminmax(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (min, max) of ``g`` (G, N). A single row is reduced as a whole: ``aminmax(dim=1)`` on one
    long row runs on one thread and was measured 17x slower than the full reduction on a MobileNetV2
    activation (150 ms vs 8.6 ms for 38 M elements on 2 cores)."""
    if g.shape[0] == 1:
        lo, hi = torch.aminmax(g)
        return lo.reshape(1), hi.reshape(1)
    return torch.aminmax(g, dim=1)


class MinMaxObserver:
    """Running minimum and maximum per group.

    >>> obs = MinMaxObserver(); obs.update(torch.tensor([1.0, -2.0])); obs.update(torch.tensor([3.0]))
    >>> obs.min.tolist(), obs.max.tolist()
    ([-2.0], [3.0])
    """

    def __init__(self, granularity: Granularity = PerTensor(), name: str = "tensor"):
        self.granularity = granularity
        self.name = name
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.shape = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        seen = _grouped_range(x, self.granularity, self.name)
        if seen is not None:
            _, lo, hi = seen
            self._fold(lo, hi, x.shape)

    def _fold(self, lo, hi, shape):
        if self.min is None:
            self.min, self.max, self.shape = lo, hi, shape
        else:
            if lo.shape != self.min.shape:
                raise ValueError(f"{self.name}: tensor shape changed between batches in a way that changes "
                                 f"the number of quantization groups ({self.min.numel()} -> {lo.numel()})")
            self.min, self.max = torch.minimum(self.min, lo), torch.maximum(self.max, hi)

    @property
    def empty(self) -> bool:
        return self.min is None

    def merge(self, other: "MinMaxObserver") -> "MinMaxObserver":
        """Combine with another observer of the same tensor (e.g. from another process)."""
        if not other.empty:
            self._fold(other.min, other.max, other.shape)
        return self


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of per-batch minima and maxima (``momentum`` weights the old value)."""

    def __init__(self, granularity: Granularity = PerTensor(), name: str = "tensor", momentum: float = 0.9):
        super().__init__(granularity, name)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.count = 0

    def _fold(self, lo, hi, shape):
        if self.min is None:
            self.min, self.max, self.shape = lo, hi, shape
        else:
            m = self.momentum
            self.min = m * self.min + (1 - m) * lo
            self.max = m * self.max + (1 - m) * hi
        self.count += 1

    def merge(self, other: "MovingAverageMinMaxObserver") -> "MovingAverageMinMaxObserver":
        """Average of the two running estimates, weighted by how many batches each saw."""
        if other.empty:
            return self
        if self.empty:
            self.min, self.max, self.shape, self.count = other.min, other.max, other.shape, other.count
            return self
        a, b = self.count, other.count
        self.min = (a * self.min + b * other.min) / (a + b)
        self.max = (a * self.max + b * other.max) / (a + b)
        self.count = a + b
        return self


class MeanMinMaxObserver(MinMaxObserver):
    """Mean over samples of each sample's minimum and maximum per group (dim 0 is the sample axis).

    Robust to rare outliers (one crop with a bright highlight moves a running max for good, but a mean
    only by 1/N) and independent of how the data is batched: a batch of 32 counts as 32 samples. A
    tensor without a batch axis (0-d or 1-d) counts as one sample.

    The extremes of a small sample are not extremes of the distribution (the maximum of 16 Gaussian
    values is about 1.8 sigma), so where a sample holds fewer than :attr:`MIN_VALUES` values per group
    (a linear layer's input, a pooled feature vector of a small net) the observer reports the running
    minimum and maximum instead, as ``minmax`` would.

    >>> obs = MeanMinMaxObserver(); obs.update(torch.arange(4096.0).reshape(2, 2048))
    >>> obs.min.tolist(), obs.max.tolist(), obs.count
    ([1024.0], [3071.0], 2)
    """

    MIN_VALUES = 1024

    def __init__(self, granularity: Granularity = PerTensor(), name: str = "tensor"):
        super().__init__(granularity, name)
        self.count = 0
        self.values_per_sample: int | None = None
        self._sum_lo = self._sum_hi = self._run_lo = self._run_hi = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        samples = x.reshape(1, -1) if x.dim() < 2 else x
        lo, hi = self._per_sample(samples)
        _check_finite(x, self.name, lo, hi)
        self._observe(lo, hi)
        per_group = samples[0].numel() // max(1, lo.shape[1])
        self._add(lo.double().sum(0), hi.double().sum(0), lo.amin(0), hi.amax(0), samples.shape[0], per_group, x.shape)

    def _observe(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Per-sample extremes ``(B, G)`` of one batch (kept by subclasses that need more than their sum)."""

    def _per_sample(self, x: torch.Tensor):
        """Per-sample, per-group (min, max), each (B, G)."""
        if isinstance(self.granularity, PerTensor):
            return torch.aminmax(x.float().reshape(x.shape[0], -1), dim=1, keepdim=True)
        los, his = zip(*(group_aminmax(to_groups(s.float(), self.granularity)) for s in x.split(1)))
        return torch.stack(los), torch.stack(his)

    def _add(self, sum_lo, sum_hi, run_lo, run_hi, n, per_group, shape):
        if self._sum_lo is None:
            self._sum_lo, self._sum_hi, self._run_lo, self._run_hi, self.shape = sum_lo, sum_hi, run_lo, run_hi, shape
        elif sum_lo.shape != self._sum_lo.shape:
            raise ValueError(f"{self.name}: tensor shape changed between batches in a way that changes "
                             f"the number of quantization groups ({self._sum_lo.numel()} -> {sum_lo.numel()})")
        else:
            self._sum_lo, self._sum_hi = self._sum_lo + sum_lo, self._sum_hi + sum_hi
            self._run_lo, self._run_hi = torch.minimum(self._run_lo, run_lo), torch.maximum(self._run_hi, run_hi)
        self.count += n
        self.values_per_sample = per_group if self.values_per_sample is None else min(self.values_per_sample, per_group)
        if self.values_per_sample < self.MIN_VALUES:
            self.min, self.max = self._run_lo.float(), self._run_hi.float()
        else:
            self.min, self.max = self._typical()

    def _typical(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The typical per-sample ``(min, max)`` per group: here their means."""
        return (self._sum_lo / self.count).float(), (self._sum_hi / self.count).float()

    def merge(self, other: "MeanMinMaxObserver") -> "MeanMinMaxObserver":
        """Combine with another observer of the same tensor: the mean over both sets of samples."""
        if not other.empty:
            self._add(other._sum_lo, other._sum_hi, other._run_lo, other._run_hi, other.count,
                      other.values_per_sample, other.shape)
        return self


class MedianMinMaxObserver(MeanMinMaxObserver):
    """Median over samples of each sample's minimum and maximum per group.

    Where per-sample peaks are skewed (most samples peak low, a few high), the mean is pulled up by the
    few and the median is not. :func:`edgequant.quantize` uses it at the depthwise inputs that
    :func:`edgequant.ptq.equalize_activations` equalized. It keeps two numbers per sample and group (the
    extremes); like the mean, it falls back to the running extremes under :attr:`MIN_VALUES` values per
    sample.

    >>> obs = MedianMinMaxObserver(); obs.update(torch.arange(4096.0).reshape(4, 1024) ** 2)
    >>> obs.max.tolist(), obs.count  # the per-sample maxima are 1023**2, 2047**2, 3071**2, 4095**2
    ([6810625.0], 4)
    """

    def __init__(self, granularity: Granularity = PerTensor(), name: str = "tensor"):
        super().__init__(granularity, name)
        self._lo_samples: list[torch.Tensor] = []
        self._hi_samples: list[torch.Tensor] = []

    def _observe(self, lo, hi):
        self._lo_samples.append(lo.detach().double().cpu())
        self._hi_samples.append(hi.detach().double().cpu())

    def _typical(self):
        device = self._sum_lo.device
        return tuple(_median(torch.cat(v)).float().to(device) for v in (self._lo_samples, self._hi_samples))

    def merge(self, other: "MedianMinMaxObserver") -> "MedianMinMaxObserver":
        """Combine with another observer of the same tensor: the median over both sets of samples."""
        if not other.empty:
            self._lo_samples = self._lo_samples + other._lo_samples
            self._hi_samples = self._hi_samples + other._hi_samples
        return super().merge(other)


def _median(v: torch.Tensor) -> torch.Tensor:
    """Median over dim 0 (the mean of the two middle values for an even count, as ``numpy.median``)."""
    s = v.sort(dim=0).values
    n = s.shape[0]
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


class HistogramObserver:
    """A histogram of ``bins`` equal bins per group over the running ``[min, max]``.

    When a batch widens the range, the old counts are redistributed onto the new bins (linear
    interpolation of the cumulative counts), so the result does not depend much on batch order.
    Min and max are exact.
    """

    #: per batch and group, about this many elements enter the histogram (every k-th, k a prime, so the
    #: sample does not alias with power-of-two or 7-multiple feature-map sizes); min and max use every element
    max_samples: int = 1 << 20

    def __init__(self, granularity: Granularity = PerTensor(), name: str = "tensor", bins: int = 2048):
        if bins < 8:
            raise ValueError(f"bins must be >= 8, got {bins}")
        self.granularity = granularity
        self.name = name
        self.bins = bins
        self._offset = 0
        self.hist: torch.Tensor | None = None  # (G, bins) float64 counts
        self.zeros: torch.Tensor | None = None  # (G,) counts of exact zeros (no rounding error)
        self.min: torch.Tensor | None = None  # (G,) exact data minimum
        self.max: torch.Tensor | None = None
        self.lo: torch.Tensor | None = None  # (G,) histogram edges
        self.hi: torch.Tensor | None = None
        self.shape = None

    @property
    def empty(self) -> bool:
        return self.hist is None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        seen = _grouped_range(x, self.granularity, self.name)
        if seen is None:
            return
        g, dmin, dmax = seen
        if self.hist is None:
            self.shape = x.shape
            self.min, self.max = dmin, dmax
            lo, hi = dmin, torch.maximum(dmax, dmin + 1e-12)
            self.hist = torch.zeros(g.shape[0], self.bins, dtype=torch.float64, device=g.device)
            self.lo, self.hi = lo, hi
        else:
            if dmin.shape != self.min.shape:
                raise ValueError(f"{self.name}: number of quantization groups changed between batches")
            self.min, self.max = torch.minimum(self.min, dmin), torch.maximum(self.max, dmax)
            self._widen(torch.minimum(self.lo, dmin), torch.maximum(self.hi, dmax))
        sample = self._sample(g)
        self.hist += self._histc(sample, self.lo, self.hi)
        z = (sample == 0).sum(dim=1).double()
        self.zeros = z if self.zeros is None else self.zeros + z
        self._offset += 1

    def _sample(self, g):
        if g.shape[1] <= 2 * self.max_samples:
            return g
        k = _next_prime(g.shape[1] // self.max_samples)
        return g[:, self._offset % k::k]

    def _histc(self, g, lo, hi):
        """Per-row histogram of ``g`` (G, N) over per-row edges ``[lo, hi]``."""
        G = g.shape[0]
        if G == 1:
            return torch.histc(g, self.bins, min=float(lo[0]), max=float(hi[0])).double()[None]
        width = (hi - lo).clamp(min=1e-12)
        idx = ((g - lo[:, None]) / width[:, None] * self.bins).floor_().clamp_(0, self.bins - 1).long()
        idx += torch.arange(G, device=g.device)[:, None] * self.bins
        return torch.bincount(idx.reshape(-1), minlength=G * self.bins).double().reshape(G, self.bins)

    def _widen(self, new_lo, new_hi):
        if torch.equal(new_lo, self.lo) and torch.equal(new_hi, self.hi):
            return
        self.hist = _rebin(self.hist, self.lo, self.hi, new_lo, new_hi)
        self.lo, self.hi = new_lo, new_hi

    def fraction_outside(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """(G,) share of the observed values (by histogram bin centre) outside ``[lo, hi]`` per group."""
        centers = self.lo[:, None] + (torch.arange(self.bins, device=self.hist.device) + 0.5)[None] * \
            ((self.hi - self.lo) / self.bins)[:, None]
        out = (centers < lo.reshape(-1, 1).to(centers)) | (centers > hi.reshape(-1, 1).to(centers))
        return (self.hist * out).sum(1) / self.hist.sum(1).clamp(min=1)

    def merge(self, other: "HistogramObserver") -> "HistogramObserver":
        """Combine with another histogram of the same tensor (e.g. from another process)."""
        if other.empty:
            return self
        if self.empty:
            self.hist, self.min, self.max = other.hist.clone(), other.min, other.max
            self.lo, self.hi, self.shape, self.zeros = other.lo, other.hi, other.shape, other.zeros.clone()
            return self
        lo, hi = torch.minimum(self.lo, other.lo), torch.maximum(self.hi, other.hi)
        self._widen(lo, hi)
        self.hist = self.hist + _rebin(other.hist, other.lo, other.hi, lo, hi)
        self.zeros = self.zeros + other.zeros
        self.min, self.max = torch.minimum(self.min, other.min), torch.maximum(self.max, other.max)
        return self

    def bin_centers(self) -> torch.Tensor:
        """(G, bins) centre of each bin."""
        w = (self.hi - self.lo) / self.bins
        k = torch.arange(self.bins, dtype=torch.float64, device=self.hist.device)
        return self.lo.double()[:, None] + (k[None, :] + 0.5) * w.double()[:, None]


def _next_prime(n: int) -> int:
    n = max(n, 11)
    while any(n % p == 0 for p in range(2, int(n**0.5) + 1)):
        n += 1
    return n


def _rebin(hist, lo, hi, new_lo, new_hi):
    """Redistribute (G, B) counts over ``[lo, hi]`` onto B bins over ``[new_lo, new_hi]``."""
    G, B = hist.shape
    cdf = torch.cat([torch.zeros(G, 1, dtype=hist.dtype, device=hist.device), hist.cumsum(dim=1)], dim=1)  # (G, B+1)
    k = torch.arange(B + 1, dtype=torch.float64, device=hist.device)
    new_edges = new_lo.double()[:, None] + k[None, :] * ((new_hi - new_lo).double() / B)[:, None]
    # position of each new edge in old-bin units
    pos = (new_edges - lo.double()[:, None]) / ((hi - lo).double().clamp(min=1e-300) / B)[:, None]
    pos = pos.clamp(0, B)
    i0 = pos.floor().long().clamp(max=B - 1)
    frac = pos - i0
    c0 = cdf.gather(1, i0)
    c1 = cdf.gather(1, i0 + 1)
    new_cdf = c0 + frac * (c1 - c0)
    return new_cdf.diff(dim=1).clamp_(min=0)


class TensorObserver:
    """Keeps the observed values themselves (for one-shot tensors such as weights), so range searches
    can measure the exact error instead of a histogram estimate. ``update`` may be called once."""

    def __init__(self, granularity: Granularity = PerTensor(), name: str = "tensor"):
        self.granularity = granularity
        self.name = name
        self.values: torch.Tensor | None = None  # (G, N)
        self.min = self.max = None
        self.shape = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if self.values is not None:
            raise RuntimeError(f"{self.name}: a TensorObserver observes one tensor; use a HistogramObserver for batches")
        x = x.detach()
        _check_finite(x, self.name)
        self.values = to_groups(x.float(), self.granularity)
        self.min, self.max = group_aminmax(self.values)
        self.shape = x.shape

    @property
    def empty(self) -> bool:
        return self.values is None
