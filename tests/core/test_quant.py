"""The quantization formula: golden vectors, a float64 oracle, and properties (Hypothesis)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgequant.core import (MIN_SCALE, Encoding, PerBlock, PerChannel, PerTensor, choose_qparams, dequantize,
                            fake_quantize, qrange, quantize)


def test_qrange_golden():
    assert qrange(8, True) == (-128, 127)
    assert qrange(8, False) == (0, 255)
    assert qrange(8, True, narrow_range=True) == (-127, 127)
    assert qrange(4, True) == (-8, 7)
    assert qrange(2, False) == (0, 3)
    assert qrange(16, True) == (-32768, 32767)
    for bad in (1, 17, 8.0, True):
        with pytest.raises(ValueError):
            qrange(bad, True)
    with pytest.raises(ValueError, match="signed"):
        qrange(8, False, narrow_range=True)


def test_quantize_golden_with_saturation():
    x = torch.tensor([-100.0, -1.0, -0.25, 0.0, 0.25, 0.75, 1.0, 100.0])
    s, z = torch.tensor(0.5), torch.tensor(-3, dtype=torch.int32)
    q = quantize(x, s, z, -8, 7)
    # round(x/0.5) = [-200, -2, -0 (half to even), 0, 0 (half to even), 2 (1.5 -> 2), 2, 200], + z=-3, clamp [-8, 7]
    assert q.tolist() == [-8, -5, -3, -3, -3, -1, -1, 7]
    assert dequantize(q, s, z).tolist() == [-2.5, -1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 5.0]
    assert fake_quantize(x, s, z, -8, 7).tolist() == [-2.5, -1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 5.0]


def test_choose_qparams_golden():
    s, z = choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), 0, 255, symmetric=False)
    assert s.item() == pytest.approx(4 / 255)
    assert z.item() == 64  # 0 - round(-1 / (4/255)) = round(63.75)
    s, z = choose_qparams(torch.tensor(-2.0), torch.tensor(1.0), -128, 127, symmetric=True)
    assert s.item() == pytest.approx(2 / 127) and z.item() == 0
    s, z = choose_qparams(torch.tensor(0.5), torch.tensor(3.0), 0, 255, symmetric=True)  # unsigned symmetric
    assert s.item() == pytest.approx(3 / 255) and z.item() == 0
    # a range that excludes 0 is widened to include it
    s, z = choose_qparams(torch.tensor(2.0), torch.tensor(3.0), 0, 255, symmetric=False)
    assert z.item() == 0 and s.item() == pytest.approx(3 / 255)
    with pytest.raises(ValueError, match="not finite"):
        choose_qparams(torch.tensor(float("nan")), torch.tensor(1.0), 0, 255, False)


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_and_constant_channels_are_finite(symmetric):
    w = torch.zeros(4, 3)
    w[1] = 2.5  # constant channel
    w[2] = -1e-30  # tiny channel
    lo, hi = w.amin(1), w.amax(1)
    s, z = choose_qparams(lo, hi, -128, 127, symmetric)
    assert torch.isfinite(s).all() and (s >= MIN_SCALE).all()
    out = fake_quantize(w, s, z, -128, 127, PerChannel(0))
    assert torch.isfinite(out).all()
    assert out[0].eq(0).all() and torch.allclose(out[1], w[1], rtol=1e-2)


def _oracle(x, s, z, qmin, qmax):
    """numpy float64 reference of the ONNX formula."""
    q = np.clip(np.round(x / s) + z, qmin, qmax)  # np.round is half-to-even, like ONNX
    return (q - z) * s


def test_float64_oracle_matches_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, generator=g, dtype=torch.float64) * 3
    x[:50] = torch.arange(50, dtype=torch.float64) * 0.05 - 1.25  # exact .5 ties at scale 0.1
    for qmin, qmax, s, z in [(-128, 127, 0.1, 0), (0, 255, 0.037, 91), (-8, 7, 0.4, 2), (0, 65535, 1e-4, 30000)]:
        ours = fake_quantize(x, torch.tensor(s, dtype=torch.float64), torch.tensor(z), qmin, qmax).numpy()
        np.testing.assert_array_equal(ours, _oracle(x.numpy(), s, z, qmin, qmax))


finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(xs=st.lists(finite, min_size=1, max_size=64), lo=st.floats(-100, 0, width=32), span=st.floats(0.0009765625, 200, width=32),
       bits=st.integers(2, 16), signed=st.booleans(), symmetric=st.booleans())
def test_properties(xs, lo, span, bits, signed, symmetric):
    x = torch.tensor(xs, dtype=torch.float32)
    qmin, qmax = qrange(bits, signed)
    s, z = choose_qparams(torch.tensor(lo), torch.tensor(lo + span), qmin, qmax, symmetric)
    xh = fake_quantize(x, s, z, qmin, qmax)
    # bit-exact with dequantize(quantize(x))
    assert torch.equal(xh, dequantize(quantize(x, s, z, qmin, qmax), s, z))
    # idempotent
    assert torch.equal(fake_quantize(xh, s, z, qmin, qmax), xh)
    # zero is exactly representable
    assert fake_quantize(torch.zeros(1), s, z, qmin, qmax).item() == 0.0
    e_lo, e_hi = ((qmin - z) * s).item(), ((qmax - z) * s).item()
    inside = (x >= e_lo) & (x <= e_hi)
    err = (x - xh).abs()
    tol = s.item() / 2 * (1 + 1e-5) + 1e-6 * x.abs()
    assert (err[inside] <= tol[inside]).all()
    # outside the grid values clip to its edges
    assert torch.allclose(xh[x > e_hi], torch.full_like(xh[x > e_hi], e_hi), rtol=1e-6)
    assert torch.allclose(xh[x < e_lo], torch.full_like(xh[x < e_lo], e_lo), rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=2, max_size=4), axis_seed=st.integers(0, 100), block=st.integers(1, 4))
def test_per_channel_and_per_block_equal_a_loop_of_per_tensor(shape, axis_seed, block):
    g = torch.Generator().manual_seed(axis_seed)
    x = torch.randn(*shape, generator=g)
    axis = axis_seed % len(shape)
    for gran in (PerChannel(axis), PerBlock(block, axis)):
        pshape = gran.param_shape(x.shape)
        s = torch.rand(pshape, generator=g) * 0.5 + 0.01
        z = torch.randint(-3, 4, pshape, generator=g, dtype=torch.int32)
        out = fake_quantize(x, s, z, -8, 7, gran)
        # reference: walk every element and find its parameter index
        ref = torch.empty_like(x)
        for idx in np.ndindex(*x.shape):
            pidx = list(idx)
            if isinstance(gran, PerChannel):
                pidx = (idx[axis],)
            else:
                pidx[axis] = idx[axis] // block
                pidx = tuple(pidx)
            ref[idx] = fake_quantize(x[idx], s[pidx], z[pidx], -8, 7)
        assert torch.equal(out, ref)


def test_straight_through_gradient():
    x = torch.tensor([-5.0, -0.3, 0.0, 0.4, 5.0], requires_grad=True)
    y = fake_quantize(x, torch.tensor(0.1), torch.tensor(0), -10, 10)
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # clipped elements get no gradient


def test_encoding_roundtrip_and_validation():
    e = Encoding(torch.tensor([0.1, 0.2]), torch.tensor([0, 3], dtype=torch.int32), bits=4, signed=True,
                 symmetric=False, granularity=PerChannel(0))
    e2 = Encoding.from_dict(e.to_dict())
    assert torch.equal(e2.scale, e.scale) and torch.equal(e2.zero_point, e.zero_point) and e2.granularity == e.granularity
    bad = e.to_dict() | {"zero_point": [0, 99]}
    with pytest.raises(ValueError, match="outside the grid"):
        Encoding.from_dict(bad, where="w")
    with pytest.raises(ValueError, match="every scale must be finite"):
        Encoding.from_dict(e.to_dict() | {"scale": [0.1, -1.0]})
    with pytest.raises(ValueError, match="needs 2 values"):
        Encoding.from_dict(e.to_dict() | {"scale": [0.1]})


def test_granularity_rejects_class_instead_of_instance():
    from edgequant.core import check_granularity

    with pytest.raises(TypeError, match=r"use PerChannel\(\) instead of PerChannel"):
        check_granularity(PerChannel)
    assert PerBlock(32, 1).param_shape(torch.Size([8, 70])) == (8, math.ceil(70 / 32))
    assert PerTensor().param_shape(torch.Size([3, 4])) == ()
