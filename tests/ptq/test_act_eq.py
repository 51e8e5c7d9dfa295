import copy

import torch
from torch import nn

from edgequant import QuantSim
from edgequant.metrics import sqnr_db
from edgequant.nn import ChannelClamp
from edgequant.ptq import equalize_activations, fold_batch_norms


def _skew_expand(net):
    """Give the channels that feed the depthwise conv ranges 1000x apart (as MobileNets have)."""
    net = copy.deepcopy(net)
    scale = torch.logspace(-2, 1, 32)[torch.randperm(32, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        net.expand[1].weight.mul_(scale)  # BN gamma and beta of the expansion
        net.expand[1].bias.mul_(scale)
        net.expand[2] = nn.ReLU()  # an unbounded activation, so the scale reaches the depthwise input
        net.dw[0].weight.div_(scale.view(-1, 1, 1, 1))
    return net.eval()


def test_equalization_is_exact_and_makes_channel_ranges_equal(tiny_net, digits):
    x = digits[2][:128]
    net = _skew_expand(tiny_net)
    eq, report = equalize_activations(net, [x[:64], x[64:]])
    assert report.pairs == [("expand.0", "dw.0")]  # only pairs whose second layer is depthwise
    assert report.spread["dw.0"] > 100
    with torch.no_grad():
        assert sqnr_db(net(x), eq(x)) > 80  # the float model is unchanged up to rounding
        h = eq.expand(eq.stem(x))
    r = h.abs().amax(dim=(0, 2, 3))
    assert float(r.min() / r.max()) > 0.99
    assert isinstance(net.expand[0], nn.Conv2d) and not hasattr(net.expand[0], "bn_mean")  # input untouched


def test_relu6_becomes_a_channel_clamp_and_stays_exact(tiny_net, digits):
    x = digits[2][:64]
    eq, report = equalize_activations(tiny_net, [x])
    assert report.replaced_activations == ["expand.2"] and isinstance(eq.expand[2], ChannelClamp)
    with torch.no_grad():
        assert sqnr_db(tiny_net(x), eq(x)) > 80


def test_per_channel_weights_keep_their_integers_and_per_tensor_activations_gain(tiny_net, digits):
    x, ev = digits[2][:128], digits[2][128:384]
    net = _skew_expand(tiny_net)
    folded = fold_batch_norms(net)[0]
    eq = equalize_activations(net, [x])[0]
    sims = []
    for m in (folded, eq):
        sim = QuantSim(m, x[:1], "w8a8")
        sim.calibrate([x], progress=False)
        sims.append(sim)
    for name in ("expand.0.weight", "dw.0.weight"):
        q0, q1 = sims[0].quantizers()[name], sims[1].quantizers()[name]
        w0 = folded.get_submodule(name[:-7]).weight
        w1 = eq.get_submodule(name[:-7]).weight
        i0 = torch.round(w0 / q0.scale.reshape(-1, 1, 1, 1))
        i1 = torch.round(w1 / q1.scale.reshape(-1, 1, 1, 1))
        assert (i0 != i1).float().mean() < 0.01  # same integers (a rare flip at a rounding tie)
    with torch.no_grad():
        ref = net(ev)
        before, after = sqnr_db(ref, sims[0](ev)), sqnr_db(ref, sims[1](ev))
    assert after > before + 3, (before, after)


def test_quantize_calibrates_the_equalized_inputs_with_the_median_of_per_sample_peaks(tiny_net, digits):
    from dataclasses import replace

    import edgequant
    from edgequant import Override, QuantConfig

    x = digits[2][:96]
    batches = [x[:32], x[32:64], x[64:]]
    net = _skew_expand(tiny_net)
    res = edgequant.quantize(net, batches, "w8a8", ptq=["bn_fold", "act_eq"], progress=False)
    container, key = res.sim.model.get_submodule("dw.0")._bias_input  # the quantizer the depthwise layer reads
    name = container[key].tensor_name
    spec = res.sim.plan[name].spec
    assert spec.range_method == "median_minmax"
    assert "median" in res.report.stages[-1].detail
    q = res.sim.quantizers()[name]
    top = float(q.scale) * (q.qmax - float(q.zero_point))
    res.sim.disable(role="activation")  # as in calibration: activations in float, weights quantized
    res.sim.enable([name])
    peaks = []
    h = q.register_forward_pre_hook(lambda m, a: peaks.append(a[0].flatten(1).amax(1)))
    with torch.no_grad():
        for b in batches:
            res.sim(b)
    h.remove()
    peaks = torch.cat(peaks).double()
    median, mean = float(peaks.quantile(0.5)), float(peaks.mean())
    assert abs(mean - median) > 0.005 * median, (mean, median)  # the two rules differ here
    assert abs(top - median) < 1e-4 * median, (top, median)
    # a range method the user chose for that tensor is kept
    cfg = QuantConfig.preset("w8a8")
    cfg = replace(cfg, module_names={name: Override(activation=replace(cfg.activation, range_method="minmax"))})
    res = edgequant.quantize(net, batches, cfg, ptq=["bn_fold", "act_eq"], progress=False)
    assert res.sim.plan[name].spec.range_method == "minmax"
