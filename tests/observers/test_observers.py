import pytest
import torch

from edgequant.core import PerChannel, fake_quantize, qrange
from edgequant.observers import (HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver, compute_qparams,
                                 make_observer)


def test_minmax_merge_equals_one_observer():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 100, generator=g), torch.randn(8, 100, generator=g) * 3
    one = MinMaxObserver(PerChannel(0))
    one.update(torch.cat([a, b], 1))
    pa, pb = MinMaxObserver(PerChannel(0)), MinMaxObserver(PerChannel(0))
    pa.update(a)
    pb.update(b)
    pa.merge(pb)
    assert torch.equal(pa.min, one.min) and torch.equal(pa.max, one.max)


def test_moving_average():
    o = MovingAverageMinMaxObserver(momentum=0.5)
    o.update(torch.tensor([-1.0, 1.0]))
    o.update(torch.tensor([-3.0, 3.0]))
    assert o.min.item() == -2.0 and o.max.item() == 2.0


def test_histogram_merge_keeps_counts_and_extremes():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5000, generator=g), torch.randn(5000, generator=g) * 4 + 2
    h1, h2, both = HistogramObserver(bins=256), HistogramObserver(bins=256), HistogramObserver(bins=256)
    h1.update(a)
    h2.update(b)
    both.update(a)
    both.update(b)
    h1.merge(h2)
    assert h1.hist.sum().item() == pytest.approx(10000, rel=1e-9)
    assert h1.min.item() == min(a.min(), b.min()) and h1.max.item() == max(a.max(), b.max())
    # merged and sequential histograms describe the same distribution (CDF within 1%)
    assert (h1.hist.cumsum(1) - both.hist.cumsum(1)).abs().max().item() / 10000 < 0.01


def test_percentile_matches_quantile():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(2))
    o = make_observer("percentile")
    for chunk in x.chunk(4):
        o.update(chunk)
    from edgequant.observers import choose_range

    lo, hi = choose_range(o, "percentile", 0, 255, False, percentile=99.0)
    assert hi.item() == pytest.approx(torch.quantile(x, 0.99).item(), abs=0.02)
    assert lo.item() == pytest.approx(torch.quantile(x, 0.01).item(), abs=0.02)


@pytest.mark.parametrize("exact", [False, True])
def test_mse_beats_minmax_on_heavy_tails_and_sqnr_clips_less(exact):
    torch.manual_seed(3)
    x = torch.distributions.Laplace(0.0, 1.0).sample((100_000,))
    qmin, qmax = qrange(4, True)
    errs, his = {}, {}
    for m in ("minmax", "mse", "sqnr"):
        o = make_observer(m, exact=exact)
        o.update(x)
        s, z = compute_qparams(o, m, qmin, qmax, symmetric=True)
        errs[m] = (fake_quantize(x, s, z, qmin, qmax) - x).pow(2).mean().item()
        his[m] = s.item() * qmax
    assert errs["mse"] < 0.5 * errs["minmax"]
    assert his["mse"] <= his["sqnr"] <= his["minmax"]


def test_nan_in_observed_tensor_names_it():
    o = make_observer("sqnr", name="features.3.add")
    with pytest.raises(ValueError, match=r"features\.3\.add: found 1 NaN"):
        o.update(torch.tensor([1.0, float("nan")]))
    o = make_observer("minmax", name="x")
    with pytest.raises(ValueError, match="Inf"):
        o.update(torch.tensor([1.0, float("inf")]))


def test_mean_minmax_counts_samples_not_batches_and_merges():
    from edgequant.observers import MeanMinMaxObserver

    x = torch.randn(12, 3, 20, 20) * torch.linspace(0.5, 4, 12).view(-1, 1, 1, 1)
    whole, batched, a, b = (MeanMinMaxObserver() for _ in range(4))
    whole.update(x)
    for chunk in x.split(5):  # batches of 5, 5 and 2: each sample counts once
        batched.update(chunk)
    a.update(x[:7])
    b.update(x[7:])
    a.merge(b)
    per_sample = x.reshape(12, -1)
    for obs in (whole, batched, a):
        assert obs.count == 12
        assert torch.allclose(obs.max, per_sample.amax(1).mean().reshape(1), atol=1e-6)
        assert torch.allclose(obs.min, per_sample.amin(1).mean().reshape(1), atol=1e-6)
    # narrower than the running extremes: one outlier sample moves the range by 1/N only
    assert float(whole.max) < float(x.max()) and float(whole.min) > float(x.min())


def test_mean_minmax_per_channel_and_weights_fall_back_to_minmax():
    from edgequant.core.granularity import PerChannel
    from edgequant.observers import MeanMinMaxObserver, MinMaxObserver, make_observer

    x = torch.randn(4, 3, 32, 32) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1)
    obs = MeanMinMaxObserver(PerChannel(1))
    obs.update(x)
    want = x.transpose(0, 1).reshape(3, 4, -1).amax(2).mean(1)
    assert torch.allclose(obs.max, want, atol=1e-6)
    # 16 values per sample are too few for their extremes to mean anything: the running extremes
    small = MeanMinMaxObserver()
    v = torch.randn(64, 16)
    small.update(v)
    assert float(small.max) == float(v.max()) and float(small.min) == float(v.min())
    # a weight is one tensor, not a batch of samples: its range is its min-max
    assert type(make_observer("mean_minmax", PerChannel(0), exact=True)) is MinMaxObserver


def test_median_minmax_ignores_a_few_high_peaks_merges_and_falls_back():
    from edgequant.observers import MedianMinMaxObserver, make_observer

    x = torch.rand(9, 2, 32, 32)
    x[:3] *= 10  # three of nine samples peak 10x higher
    obs, a, b = MedianMinMaxObserver(), MedianMinMaxObserver(), MedianMinMaxObserver()
    for chunk in x.split(4):
        obs.update(chunk)
    a.update(x[:5])
    b.update(x[5:])
    a.merge(b)
    want = x.reshape(9, -1).amax(1).median()  # odd count: the middle one
    for o in (obs, a):
        assert o.count == 9 and torch.allclose(o.max, want.reshape(1))
    assert float(obs.max) < 1.0 < float(make_observer("mean_minmax").merge(obs).max)  # the mean is pulled up
    small = MedianMinMaxObserver()
    small.update(torch.randn(64, 16))  # too few values per sample: the running extremes
    assert float(small.max) == float(small._run_hi)
