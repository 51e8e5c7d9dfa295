import copy
import dataclasses

import pytest
import torch

from edgequant import NotCalibratedError, QuantSim, quantize
from edgequant.metrics import sqnr_db
from edgequant.core.granularity import expand_param
from edgequant.ptq import adaround, correct_bias, fold_batch_norms, loss_aware_output_range, pipeline

from .conftest import accuracy
from .test_data_free import _mean_shift


def _batches(x, n=4, size=64):
    return [x[i * size:(i + 1) * size] for i in range(n)]


def _folded_sim(net, x, config):
    """(BN-folded float model, its calibrated sim)."""
    folded, _ = fold_batch_norms(net)
    sim = QuantSim(folded, x[:1], config)
    sim.calibrate(_batches(x), progress=False)
    return folded, sim


def test_empirical_bias_correction_reduces_mean_shift_on_held_out_data(tiny_net, digits):
    xtr, _, xte, _ = digits
    folded, sim = _folded_sim(tiny_net, xtr, "w4a8_per_tensor")
    before = copy.deepcopy(sim)
    rep = correct_bias(sim, _batches(xtr), progress=False)
    assert set(rep.layers) == {"stem.0", "expand.0", "dw.0", "project.0", "head.0", "fc"}
    assert sum(rep.mean_error_after.values()) < 0.5 * sum(rep.mean_error_before.values())
    assert _mean_shift(sim, folded, xte[:256]) < 0.7 * _mean_shift(before, folded, xte[:256])
    # bad input: no batches
    with pytest.raises(ValueError, match="no batches"):
        correct_bias(sim, [], progress=False)


def test_adaround_never_worse_than_nearest_and_freezes_weights_on_grid(tiny_net, digits):
    xtr, _, xte, yte = digits
    _, sim = _folded_sim(tiny_net, xtr, "w4a8")
    nearest = copy.deepcopy(sim)
    rep = adaround(sim, _batches(xtr), iterations=150, samples=1024, progress=False)
    assert len(rep.layers) == 6
    for name, r in rep.layers.items():
        assert r.mse_adaround <= r.mse_nearest, name  # on its own objective
    assert sum(r.mse_adaround for r in rep.layers.values()) < 0.95 * sum(r.mse_nearest for r in rep.layers.values())
    # weights sit exactly on the grid, and re-calibrating keeps the learned rounding
    layer = sim.model.get_submodule("expand.0")
    q = layer.param_quantizers["weight"]
    w = layer.weight
    scaled = w / expand_param(q.scale, w.shape, q.spec.granularity)
    assert torch.allclose(scaled, scaled.round(), atol=1e-4)
    scale_before, wq_before = q.scale.clone(), q(w).detach().clone()
    sim.calibrate(_batches(xtr), progress=False)  # activations re-calibrate, the rounded weights stay
    assert q.is_frozen and torch.equal(q.scale, scale_before) and torch.equal(q(w), wq_before)
    with torch.no_grad():
        ref = tiny_net(xte)
        assert sqnr_db(ref, sim(xte)) > sqnr_db(ref, nearest(xte))
    assert accuracy(sim, xte, yte) >= accuracy(nearest, xte, yte) - 0.01


def test_adaround_needs_a_calibrated_sim(tiny_net, digits):
    sim = QuantSim(tiny_net, digits[0][:1], "w4a8")
    with pytest.raises(NotCalibratedError, match="calibrate"):
        adaround(sim, _batches(digits[0]), iterations=5, progress=False)


def test_loss_aware_output_range_lowers_cross_entropy(tiny_net, digits):
    xtr, ytr, _, _ = digits
    sim = QuantSim(tiny_net, xtr[:1], "w8a8")
    sim.calibrate(_batches(xtr), progress=False)
    q = sim.quantizers()["fc"]
    rep0 = loss_aware_output_range(sim, _batches(xtr))  # from the min-max range: never worse
    assert rep0.quantizer == "fc" and rep0.loss_after <= rep0.loss_before
    enc = q.encoding()
    q.set_encoding(dataclasses.replace(enc, scale=enc.scale * 4))  # a range 4x too wide: steps too coarse for the logits
    rep = loss_aware_output_range(sim, _batches(xtr))
    assert rep.loss_after < rep.loss_before and rep.range_after[1] < rep.range_before[1]
    rep2 = loss_aware_output_range(sim, [(b, ytr[:64]) for b in _batches(xtr, 1)], target="labels")
    assert rep2.loss_after < rep2.loss_before


def test_quantize_auto_keeps_only_helpful_stages_and_never_touches_the_model(tiny_net, digits):
    xtr, _, xte, yte = digits
    state = copy.deepcopy(tiny_net.state_dict())
    res = quantize(tiny_net, _batches(xtr, 6), recipe="w8a8_per_tensor", ptq="auto", progress=False)
    names = [s.name for s in res.report.stages]
    assert names[0] == "calibrate (no PTQ)" and "cle" in names and "bias_correction" in names and "adaround" not in names
    kept = [s for s in res.report.stages if s.kept]
    for prev, s in zip(kept, kept[1:]):  # every kept stage improved the score, or is a default-recipe stage that
        # lost less than PREFERRED_DROP_DB or improved KL or top-1 agreement
        assert s.score > prev.score or pipeline._BY_NAME[s.name].prefer and (
            s.score >= prev.score - pipeline.PREFERRED_DROP_DB or s.kl < prev.kl or s.top1 > prev.top1)
    assert all(torch.equal(v, tiny_net.state_dict()[k]) for k, v in state.items())
    acts, params = res.encodings
    assert "fc.weight" in params and "fc" in acts
    assert "| stage |" in res.report.to_markdown()
    # with an eval function and an allowed drop, it stops at the first stage that meets it
    float_acc = accuracy(tiny_net, xte, yte)
    res2 = quantize(tiny_net, _batches(xtr, 4), recipe="w8a8", eval_fn=lambda m: accuracy(m, xte, yte),
                    max_drop=1.0, progress=False)
    assert res2.report.float_score == pytest.approx(float_acc)
    assert len(res2.report.stages) == 1
    with pytest.raises(ValueError, match="unknown PTQ stage"):
        quantize(tiny_net, _batches(xtr), ptq=["cle", "magic"])


def test_quantize_data_free(tiny_net, digits):
    xte = digits[2]
    res = quantize(tiny_net, None, recipe="w8a8", ptq="auto", example_inputs=xte[:1],
                   input_ranges={"x": (float(xte.min()), float(xte.max()))}, progress=False)
    with torch.no_grad():
        assert sqnr_db(tiny_net(xte), res.sim(xte)) > 15
    with pytest.raises(ValueError, match="example_inputs"):
        quantize(tiny_net, None)
