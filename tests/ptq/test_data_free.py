import copy
import math

import pytest
import torch

from edgequant import QuantSim
from edgequant.metrics import sqnr_db
from edgequant.ptq import clipped_normal_moments, correct_bias_analytical, cross_layer_equalization, set_bn_ranges
from edgequant.ptq.bias_correction import _weighted_layers


@pytest.mark.parametrize("a,b", [(0.0, math.inf), (0.0, 6.0), (-1.0, 0.5), (-math.inf, math.inf)])
def test_clipped_normal_moments_match_monte_carlo(a, b):
    mu, sigma = torch.tensor([0.3, -2.0, 4.0]), torch.tensor([1.5, 0.7, 2.0])
    m, s = clipped_normal_moments(mu, sigma, torch.tensor(a), torch.tensor(b))
    g = torch.Generator().manual_seed(0)
    x = (mu.double()[:, None] + sigma.double()[:, None] * torch.randn(3, 400_000, generator=g, dtype=torch.float64)).clamp(a, b)
    assert torch.allclose(m, x.mean(1), atol=6e-3)
    assert torch.allclose(s, x.std(1), atol=6e-3)


def test_quantize_with_no_data(tiny_net, digits):
    x = digits[2][:256]
    eq, _ = cross_layer_equalization(tiny_net)
    sim = QuantSim(eq, x[:1], "w8a8")
    with pytest.raises(ValueError, match="input_ranges"):
        set_bn_ranges(sim)
    rep = set_bn_ranges(sim, input_ranges={"x": (float(x.min()), float(x.max()))})
    assert len(rep.set) == len(sim.activation_quantizers) and rep.from_input_ranges == ["x"]
    with torch.no_grad():
        ref = tiny_net(x)
        no_data = sqnr_db(ref, sim(x))
    assert no_data > 15  # a usable 8-bit model without a single calibration sample
    # analytical bias correction removes most of the mean shift that weight quantization causes
    sim4 = QuantSim(eq, x[:1], "w4a8")
    set_bn_ranges(sim4, input_ranges={"x": (float(x.min()), float(x.max()))})
    before = copy.deepcopy(sim4)
    rep = correct_bias_analytical(sim4)
    assert "expand.0" in rep.layers and "stem.0" in rep.skipped  # the first layer's input has no BN stats
    shift_b, shift_a = _mean_shift(before, eq, x), _mean_shift(sim4, eq, x)
    assert shift_a < 0.8 * shift_b


def _layer_means(model, names, x):
    outs = {}
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_hook(lambda mod, i, o, n=n: outs.__setitem__(n, o.mean([0, 2, 3]) if o.ndim == 4 else o.mean(0)))
             for n in names]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return outs


def _mean_shift(sim, float_model, x):
    """Mean |E[y_q] - E[y]| over the layers' output channels, weights quantized, activations float."""
    names = list(_weighted_layers(sim))
    ref = _layer_means(float_model, names, x)
    disabled = sim.disable(role="activation")
    q = _layer_means(sim.model, names, x)
    sim.enable(disabled)
    return sum(float((q[n] - ref[n]).abs().mean()) for n in names) / len(names)
