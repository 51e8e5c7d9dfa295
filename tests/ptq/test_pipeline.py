"""The one-call pipeline: what it calibrates on, how it chooses, what it tells."""
import pytest
import torch
from torch import nn

from edgequant import QuantSimWarning, quantize
from edgequant.ptq import pipeline


def _batches(x, n, size=32):
    return [x[i * size:(i + 1) * size] for i in range(n)]


def test_explicit_stages_calibrate_on_every_batch(tiny_net, digits, monkeypatch):
    """ptq='none' used to hold the last two batches out for scoring: it calibrated on half of a 4-batch set."""
    seen = []
    real = pipeline.QuantSim.calibrate

    def spy(self, data, *a, **k):
        seen.append(len(data))
        return real(self, data, *a, **k)

    monkeypatch.setattr(pipeline.QuantSim, "calibrate", spy)
    quantize(tiny_net, _batches(digits[0], 4), recipe="w8a8", ptq="none", progress=False)
    quantize(tiny_net, _batches(digits[0], 4), recipe="w8a8", ptq=["bn_fold"], progress=False)
    assert seen and all(n == 4 for n in seen)
    seen.clear()
    res = quantize(tiny_net, _batches(digits[0], 4), recipe="w8a8", ptq="auto", progress=False)
    # 'auto' chooses by score on batches it holds out, then the kept stages run again on every batch
    assert 2 in seen and 4 in seen and seen == sorted(seen) and set(seen) == {2, 4}
    kept = [s.name for s in res.report.stages if s.kept and s.name in pipeline.STAGES]
    assert res.report.refit.startswith(f"refit: the kept stages ({', '.join(kept)}) ran again") and "all 4 batches" in res.report.refit
    assert res.report.refit in res.report.to_markdown()


def test_auto_on_few_samples_says_so_and_names_the_recipe(tiny_net, digits):
    from edgequant import QuantConfig

    with pytest.warns(QuantSimWarning, match="unreliable"):
        r = quantize(tiny_net, _batches(digits[0], 3, size=8), recipe=QuantConfig.preset("w8a8"), ptq="auto", progress=False)
    assert r.report.recipe == "w8a8"  # a config equal to a preset is reported by the preset's name
    assert quantize(tiny_net, _batches(digits[0], 2), recipe="w8a8", ptq="none", progress=False,
                    recipe_name="mine").report.recipe == "mine"


def test_bn_folding_is_kept_unless_it_clearly_loses(tiny_net, digits, monkeypatch):
    """'auto' dropped bn_fold over a 0.001 dB difference; it is what an integer runtime runs."""
    import itertools

    scores = itertools.chain([10.0, 9.999, 10.5], itertools.repeat(0.0))  # baseline, bn_fold (within noise), cle, ...

    def fake_measure(self, sim):
        s = next(scores)
        return s, s, None, None

    monkeypatch.setattr(pipeline._Run, "measure", fake_measure)
    # per-tensor weights: "auto" tries CLE (with per-channel weights it equalizes activations instead)
    r = quantize(tiny_net, _batches(digits[0], 4), recipe="w8a8_per_tensor", ptq="auto", progress=False)
    kept = {s.name: s.kept for s in r.report.stages}
    assert kept["bn_fold"] is True and kept["cle"] is True
    scores = itertools.chain([10.0, 9.5, 10.05], itertools.repeat(0.0))  # bn_fold clearly worse; cle within noise
    r = quantize(tiny_net, _batches(digits[0], 4), recipe="w8a8", ptq=["bn_fold", "cle"], progress=False)
    assert all(s.kept for s in r.report.stages)  # an explicit list keeps everything
    monkeypatch.setattr(pipeline, "_resolve", lambda ptq, has: (["bn_fold", "cle", "calibrate"], True))
    scores = itertools.chain([10.0, 8.5, 8.55], itertools.repeat(0.0))  # bn_fold 1.5 dB worse: beyond PREFERRED_DROP_DB
    r = quantize(tiny_net, _batches(digits[0], 4), recipe="w8a8_per_tensor", ptq="auto", progress=False)
    kept = {s.name: s.kept for s in r.report.stages}
    assert kept["bn_fold"] is False and kept["cle"] is False


def test_a_preferred_stage_stays_when_kl_says_it_helps(tiny_net, digits, monkeypatch):
    """On a few held-out batches SQNR alone is noisy: a default-recipe stage is dropped only when SQNR, KL and top-1
    agreement all say it loses (bias correction on MobileNetV2 scored -0.3 dB there and gained 3.8 dB on other photos)."""
    import itertools

    for sq_bn, kl_bn, top1_bn, keep in ((8.5, 0.05, 0.8, True), (8.5, 0.2, 0.9, True), (9.5, 0.2, 0.8, True),
                                        (8.5, 0.2, 0.8, False)):
        # (SQNR, top-1, KL): baseline, then bn_fold 0.5 or 1.5 dB worse in SQNR with a better or worse KL / top-1
        scores = itertools.chain([(10.0, 0.8, 0.1), (sq_bn, top1_bn, kl_bn)], itertools.repeat((0.0, 0.0, 1.0)))

        def fake_measure(self, sim):
            sq, top1, kl = next(scores)
            return sq, sq, top1, kl

        monkeypatch.setattr(pipeline._Run, "measure", fake_measure)
        monkeypatch.setattr(pipeline, "_resolve", lambda ptq, has: (["bn_fold", "calibrate"], True))
        r = quantize(tiny_net, _batches(digits[0], 4), recipe="w8a8", ptq="auto", progress=False)
        assert {s.name: s.kept for s in r.report.stages}["bn_fold"] is keep


class _ListInput(nn.Module):
    """Reads a list of feature maps in a Python loop: torch.fx cannot trace it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, feats):
        return torch.cat([self.head(self.dw(torch.relu(self.bn(self.conv(f))))).flatten(1) for f in feats], dim=1)


def test_float_model_stages_read_a_model_fx_cannot_trace_through_its_examples():
    torch.manual_seed(0)
    m = _ListInput().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    data = [{"feats": [torch.randn(4, 4, 8, 8)]} for _ in range(4)]  # one map: each layer called once
    result = quantize(m, data, "w8a8", ptq=["bn_fold", "act_eq", "bias_correction"], progress=False)
    stages = {s.name: s for s in result.report.stages}
    assert stages["bn_fold"].detail.startswith("folded 1")  # torch.export's graph, read with the example
    assert "1 depthwise" in stages["act_eq"].detail
    assert result.sim.capture_mode == "graph" and stages["bias_correction"].sqnr_db > 25


def test_outputs_of_other_sizes_per_batch_are_scored():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    data = [torch.randn(2, 3, 8 + 4 * i, 8) for i in range(4)]  # fully convolutional: each batch its own height
    result = quantize(m, data, "w8a8", ptq=["bn_fold"], progress=False)
    assert all(s.sqnr_db > 20 for s in result.report.stages)
