"""QuantSim: placement, calibration, state, encodings, enable/disable, bad input."""
import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgequant import (NotCalibratedError, Override, PerChannel, QuantConfig, QuantSim, QuantSimWarning, QuantSpec,
                       GraphCaptureError)
from edgequant.analysis import sqnr_db


class Block(nn.Module):
    """conv -> bn -> relu, conv -> bn, residual add, relu, max-pool, avg-pool, linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.skip = nn.Conv2d(3, 8, 1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        y = F.relu(y + self.skip(x))
        y = self.pool(y)
        y = F.adaptive_avg_pool2d(y, 1).flatten(1)
        return self.fc(y)


def _trained(model):
    """Give BN real statistics so the model is not degenerate."""
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(16, 3, 12, 12))
    return model.eval()


def _data(n=4, seed=0, shape=(8, 3, 12, 12)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


@pytest.fixture
def block():
    torch.manual_seed(0)
    return _trained(Block())


def test_placement_supergroups_and_signedness(block):
    sim = QuantSim(block, torch.randn(1, 3, 12, 12))
    qs = sim.quantizers()
    assert sim.capture_mode == "graph"
    # one quantizer after conv1+bn1+relu (none between), add+relu fused, max-pool and flatten pass through
    # the add's two inputs (conv2+bn2 and skip) are integer tensors on a device, so each is quantized
    assert set(qs) == {"x", "relu", "conv2", "skip", "relu_1", "adaptive_avg_pool2d", "fc", "conv1.weight",
                       "conv2.weight", "skip.weight", "fc.weight"}
    assert qs["relu"].spec.signed is False and qs["x"].spec.signed is True  # unsigned after ReLU
    assert qs["conv1.weight"].spec.granularity == PerChannel(0) and qs["conv1.weight"].scale.shape == (8,)
    assert "conv1" not in qs and "bn1" not in qs and "bn2" not in qs and "pool" not in qs
    # both batch norms were folded into their convs (as an integer runtime does), and the summary says so
    assert sim.bn_folding.folded == [("conv1", "bn1"), ("conv2", "bn2")]
    assert "batch norms: 2 folded" in sim.summary()
    assert isinstance(sim.float_model().bn1, nn.Identity) and isinstance(block.bn1, nn.BatchNorm2d)


def test_fold_bn_false_keeps_batch_norms_as_float_ops(block):
    sim = QuantSim(block, torch.randn(1, 3, 12, 12), fold_bn=False)
    assert "bn2" in sim.quantizers() and "conv2" not in sim.quantizers()
    assert sim.bn_folding.folded == [] and "not folded (fold_bn=False): 2 stay float ops" in sim.summary()
    assert isinstance(sim.float_model().bn1, nn.BatchNorm2d)


def test_user_model_untouched_unless_inplace(block):
    before = copy.deepcopy(block.state_dict())
    sim = QuantSim(block, torch.randn(1, 3, 12, 12))
    sim.calibrate(_data(), progress=False)
    assert type(block.conv1) is nn.Conv2d and not hasattr(block.conv1, "param_quantizers")
    for k, v in block.state_dict().items():
        assert torch.equal(v, before[k]), k
    sim2 = QuantSim(block, torch.randn(1, 3, 12, 12), inplace=True)
    assert isinstance(block.conv1, nn.Conv2d) and hasattr(block.conv1, "param_quantizers")
    assert sim2.model.conv1 is block.conv1


def test_w8a8_is_close_to_float_and_disabled_is_exact(block):
    sim = QuantSim(block, torch.randn(1, 3, 12, 12), config="w8a8")
    sim.calibrate(_data(), progress=False)
    x = _data(1, seed=9)[0]
    with torch.no_grad():
        ref, out = block(x), sim(x)
        assert sqnr_db(ref, out) > 25  # 8-bit floor for this small net
        with sim.quantization_disabled():  # the float model with its batch norms folded, to the last bit
            assert torch.equal(sim(x), sim.float_model()(x))
            assert sqnr_db(ref, sim(x)) > 100
        assert torch.equal(sim(x), out)  # re-enabled
    w4 = QuantSim(block, torch.randn(1, 3, 12, 12), config="w4a8")
    w4.calibrate(_data(), progress=False)
    with torch.no_grad():
        assert sqnr_db(ref, w4(x)) < sqnr_db(ref, out)  # fewer bits, more noise


def test_disable_enable_by_name_type_role(block):
    sim = QuantSim(block, torch.randn(1, 3, 12, 12))
    assert sim.disable(module_type="Conv2d", role="weight") == ["conv1.weight", "conv2.weight", "skip.weight"]
    assert "conv1.weight" not in sim.quantizers() and "conv1.weight" in sim.quantizers(include_disabled=True)
    assert sim.disable(names="relu*", role="activation") == ["relu", "relu_1"]
    assert set(sim.enable()) == {"conv1.weight", "conv2.weight", "skip.weight", "relu", "relu_1"}
    assert len(sim.quantizers()) == 11


def test_state_dict_and_encodings_reproduce_outputs_exactly(block, tmp_path):
    sim = QuantSim(block, torch.randn(1, 3, 12, 12), config="w8a8_per_tensor")
    sim.calibrate(_data(), progress=False)
    x = _data(1, seed=5)[0]
    with torch.no_grad():
        out = sim(x)
    # state_dict
    fresh = QuantSim(block, torch.randn(1, 3, 12, 12), config="w8a8_per_tensor")
    fresh.load_state_dict(sim.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
    # both encodings formats
    for fmt in ("edgequant", "aimet"):
        path = tmp_path / f"enc.{fmt}.json"
        sim.save_encodings(path, format=fmt)
        fresh = QuantSim(block, torch.randn(1, 3, 12, 12), config="w8a8_per_tensor")
        fresh.load_encodings(path)
        with torch.no_grad():
            assert torch.equal(fresh(x), out), fmt
    aimet = json.loads((tmp_path / "enc.aimet.json").read_text())
    assert aimet["version"] == "1.0.0"
    w = next(e for e in aimet["param_encodings"] if e["name"] == "conv1.weight")
    assert w["is_sym"] is True and w["offset"] == [-128.0] and w["bw"] == 8  # signed symmetric int8 = offset -128
    relu = next(e for e in aimet["activation_encodings"] if e["name"] == "relu")
    assert relu["offset"] == [-sim.quantizers()["relu"].zero_point.item()]


def test_corrupt_and_mismatched_encodings_files(block, tmp_path):
    sim = QuantSim(block, torch.randn(1, 3, 12, 12))
    sim.calibrate(_data(), progress=False)
    path = tmp_path / "enc.json"
    sim.save_encodings(path)
    doc = json.loads(path.read_text())
    fresh = QuantSim(block, torch.randn(1, 3, 12, 12))

    (tmp_path / "trunc.json").write_text(path.read_text()[:100])
    with pytest.raises(ValueError, match="not a valid JSON"):
        fresh.load_encodings(tmp_path / "trunc.json")
    bad = copy.deepcopy(doc)
    bad["params"]["conv1.weight"]["scale"][0] = -1
    with pytest.raises(ValueError, match=r"params\['conv1.weight'\].*finite and > 0"):
        fresh.load_encodings(bad)
    bad = copy.deepcopy(doc)
    bad["activations"]["no.such.layer"] = bad["activations"].pop("relu")
    with pytest.raises(ValueError, match=r"activations\['no.such.layer'\] does not match"):
        fresh.load_encodings(bad)
    bad = copy.deepcopy(doc)
    del bad["activations"]["relu"]
    with pytest.raises(ValueError, match="no encoding for 1 quantizer"):
        fresh.load_encodings(bad)
    fresh.load_encodings(bad, strict=False)  # partial load allowed on request
    other = QuantSim(block, torch.randn(1, 3, 12, 12), config="w4a8")
    with pytest.raises(ValueError, match="does not match this quantizer"):
        other.load_encodings(doc)


def test_calibrate_accepts_dataloader_tuples_dicts_and_forward_fn(block):
    ds = torch.utils.data.TensorDataset(torch.randn(32, 3, 12, 12), torch.randint(0, 5, (32,)))
    sim = QuantSim(block, torch.randn(1, 3, 12, 12))
    rep = sim.calibrate(torch.utils.data.DataLoader(ds, batch_size=8), progress=False)
    assert rep.batches == 4 and all(q.is_initialized for q in sim.quantizers().values())
    sim2 = QuantSim(block, {"x": torch.randn(1, 3, 12, 12)})
    sim2.calibrate([{"x": b} for b in _data()], progress=False, num_batches=2)
    seen = []
    sim3 = QuantSim(block, torch.randn(1, 3, 12, 12))
    sim3.calibrate(_data(3), forward_fn=lambda s, b: seen.append(s(b)), progress=False)
    assert len(seen) == 3


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.ln = nn.LayerNorm(16)
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.act = nn.GELU()
        self.up = nn.ConvTranspose1d(16, 4, 2, stride=2)

    def forward(self, ids):
        h = self.ln(self.emb(ids))
        att = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 4.0, dim=-1)
        h = self.act(att @ self.v(h)) + h
        return self.up(h.transpose(1, 2))


def test_transformer_ops_embedding_and_transposed_conv_axis():
    torch.manual_seed(0)
    m = TinyTransformer().eval()
    ids = torch.randint(0, 50, (2, 7))
    sim = QuantSim(m, ids)
    qs = sim.quantizers()
    assert "ids" not in qs  # integer inputs are not quantized
    # softmax(q @ k^T / 4): the scaling inside the softmax step, one rounding of the scores
    assert {"emb.weight", "emb", "ln", "matmul", "attention_softmax", "matmul_1", "act", "add", "up", "up.weight"} <= set(qs)
    assert "truediv" not in qs and qs["attention_softmax"].spec.signed is False
    assert qs["up.weight"].spec.granularity == PerChannel(1) and qs["up.weight"].scale.shape == (4,)
    sim.calibrate([torch.randint(0, 50, (4, 7)) for _ in range(3)], progress=False)
    with torch.no_grad():
        assert sqnr_db(m(ids), sim(ids)) > 15


def test_config_overrides_applied():
    torch.manual_seed(0)
    m = _trained(Block())
    cfg = QuantConfig(module_names={"fc": Override(weight=None, activation=QuantSpec(bits=16))},
                      module_types={"relu": Override(activation=QuantSpec(bits=6, symmetric=True))})
    sim = QuantSim(m, torch.randn(1, 3, 12, 12), config=cfg)
    qs = sim.quantizers()
    assert "fc.weight" not in qs and qs["fc"].spec.bits == 16
    assert qs["relu"].spec.bits == 6 and qs["relu"].spec.symmetric and qs["relu"].spec.signed is False


class MyConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2.0


def test_subclass_keeps_its_own_forward():
    torch.manual_seed(0)
    m = nn.Sequential(MyConv(3, 4, 3), nn.ReLU()).eval()
    sim = QuantSim(m, torch.randn(1, 3, 8, 8))
    assert isinstance(sim.model.get_submodule("0"), MyConv)
    with torch.no_grad(), sim.quantization_disabled():
        x = torch.randn(2, 3, 8, 8)
        assert torch.equal(sim(x), m(x))


# ---------------------------------------------------------------- bad input
def test_nan_in_calibration_data_names_the_batch(block):
    sim = QuantSim(block, torch.randn(1, 3, 12, 12))
    data = _data(3)
    data[2][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="calibration batch 2 contains 1 NaN"):
        sim.calibrate(data, progress=False)


def test_nan_inside_the_model_names_the_tensor():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.log(self.fc(x)).relu()  # log of negatives -> NaN

    model = Bad().eval()
    sim = QuantSim(model, torch.randn(1, 4))
    x = torch.randn(8, 4)
    n_nan = int(torch.isnan(torch.log(model.fc(x))).sum())
    assert n_nan > 0
    with pytest.raises(ValueError, match=f"log: found {n_nan} NaN"):
        sim.calibrate([x], progress=False)


def test_empty_loader_and_use_before_calibration(block):
    sim = QuantSim(block, torch.randn(1, 3, 12, 12))
    with pytest.raises(NotCalibratedError, match="call sim.calibrate"):
        sim(torch.randn(1, 3, 12, 12))
    with pytest.raises(ValueError, match="yielded no batches"):
        sim.calibrate([], progress=False)
    with pytest.raises(RuntimeError, match="calibrate"):
        sim.save_encodings("unused.json")


def test_wrong_example_input_shape(block):
    with pytest.raises(ValueError, match=r"does not run on example_inputs \(shapes \[1, 5, 12, 12\]\)"):
        QuantSim(block, torch.randn(1, 5, 12, 12))


def test_constant_and_zero_channels_give_finite_scales():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()).eval()
    with torch.no_grad():
        m[0].weight[0] = 0.0
        m[0].weight[1] = 0.7
        m[0].bias.zero_()
    sim = QuantSim(m, torch.randn(1, 3, 4, 4))
    sim.calibrate([torch.zeros(2, 3, 4, 4)], progress=False)  # all-zero activations too
    for q in sim.quantizers().values():
        assert torch.isfinite(q.scale).all() and (q.scale > 0).all()
    assert torch.isfinite(sim(torch.randn(2, 3, 4, 4))).all()


def test_unsupported_module_warns_and_rest_is_quantized():
    class WithAttention(nn.Module):
        def __init__(self):
            super().__init__()
            # add_bias_kv: the one MultiheadAttention option edgequant does not decompose (it stays an opaque float op)
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)

        def forward(self, x):
            h = self.fc1(x)
            y, _ = self.attn(h, h, h)
            return self.fc2(y)

    with pytest.warns(QuantSimWarning, match=r"attn \(MultiheadAttention\)"):
        sim = QuantSim(WithAttention().eval(), torch.randn(2, 3, 4))
    qs = sim.quantizers()
    assert {"fc1.weight", "fc2.weight", "fc1", "fc2"} <= set(qs)
    assert "getitem" in qs  # the attention's output is quantized where fc2 consumes it
    sim.calibrate([torch.randn(2, 3, 4)], progress=False)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > -1e30:  # data-dependent control flow: torch.fx cannot trace this (always taken)
            y = y * 2
        return self.fc(y.mean((2, 3)))


def test_capture_failure_names_source_line_and_falls_back_to_leaves():
    m = Untraceable().eval()
    with pytest.warns(QuantSimWarning, match=r"test_quantsim.py:\d+ in forward: `if y.sum\(\) > -1e30:"):
        sim = QuantSim(m, torch.randn(1, 3, 8, 8))
    assert sim.capture_mode == "leaf"
    assert {"conv.weight", "fc.weight", "conv", "fc", "x"} <= set(sim.quantizers())
    sim.calibrate(_data(4, seed=1, shape=(8, 3, 8, 8)), progress=False)
    x = _data(1, seed=2, shape=(8, 3, 8, 8))[0]
    with torch.no_grad():
        assert sqnr_db(m(x), sim(x)) > 20
    with pytest.raises(GraphCaptureError, match="if y.sum"):
        QuantSim(m, torch.randn(1, 3, 8, 8), allow_fallback=False)


def test_unwritable_encodings_path_leaves_nothing(block, tmp_path):
    sim = QuantSim(block, torch.randn(1, 3, 12, 12))
    sim.calibrate(_data(1), progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sim.save_encodings(tmp_path / "missing" / "enc.json")
    assert list(tmp_path.iterdir()) == []


def test_summary_lists_every_quantizer(block):
    sim = QuantSim(block, torch.randn(1, 3, 12, 12))
    sim.calibrate(_data(1), progress=False)
    text = sim.summary()
    for name in sim.quantizers():
        assert name in text
    assert sim.size_bytes()["quantized"] < sim.size_bytes()["float"]


def test_output_quantizers_name_what_leaves_the_model(block):
    x = torch.randn(4, 3, 16, 16)
    sim = QuantSim(block, x[:1], config="w8a16")  # min-max activation ranges
    sim.calibrate([x], progress=False)  # on the same data: nothing clips at the output
    out = sim.output_quantizers()
    assert len(out) == 1 and out[0] in sim.quantizers()
    with torch.no_grad():
        quantized = sim(x)
        s = float(sim.quantizers()[out[0]].scale)
        assert torch.allclose(quantized / s, (quantized / s).round(), atol=1e-3)  # on the output grid
        sim.disable(out)
        assert sim.output_quantizers() == out  # still found while disabled
        free = sim(x)
    assert not torch.allclose(free / s, (free / s).round(), atol=1e-3)
    assert (free - quantized).abs().max() <= s / 2 + 1e-5  # only the output rounding went away


def test_model_outputs_use_the_output_range_method(block):
    """Percentile clipping of the logits saturates the largest ones, which decide the prediction: the
    model's output quantizers take ``output_range_method`` (min-max by default) unless a name override
    sets their spec."""
    x = torch.randn(16, 3, 16, 16)
    pct = QuantConfig.preset("w8a8")
    pct = dataclasses.replace(pct, activation=dataclasses.replace(pct.activation, range_method="percentile"))
    assert pct.output_range_method == "minmax"
    sim = QuantSim(block, x[:1], pct)
    sim.calibrate([x], progress=False)
    (out,) = sim.output_quantizers()
    qs = sim.quantizers()
    assert qs[out].spec.range_method == "minmax"
    assert {q.spec.range_method for n, q in qs.items() if q.role == "activation" and n != out} == {"percentile"}

    def grid_max(q):
        e = q.encoding()
        return float(e.scale * (e.qmax - e.zero_point))

    def grid_min(q):
        e = q.encoding()
        return float(e.scale * (e.qmin - e.zero_point))

    off = sim.disable(role="activation")  # the logits as calibration observed them (weights quantized)
    with torch.no_grad():
        float_logits = sim(x)
    sim.enable(off)
    # the grid covers every calibration logit (up to the zero point's rounding): no top logit is clipped
    half = float(qs[out].scale) / 2 + 1e-6
    assert float(float_logits.max()) <= grid_max(qs[out]) + half and float(float_logits.min()) >= grid_min(qs[out]) - half
    clipped = QuantSim(block, x[:1], dataclasses.replace(pct, output_range_method=None))
    clipped.calibrate([x], progress=False)
    assert grid_max(clipped.quantizers()[out]) <= grid_max(qs[out])
    assert clipped.quantizers()[out].spec.range_method == "percentile"
    named = QuantSim(block, x[:1], dataclasses.replace(
        pct, module_names={out: Override(activation=QuantSpec(bits=8, range_method="mse"))}))
    assert named.quantizers()[out].spec.range_method == "mse"
    with pytest.raises(ValueError, match="output_range_method"):
        QuantConfig(output_range_method="max")
    assert QuantConfig.from_json(pct.to_json()).output_range_method == "minmax"


class _Normalized(nn.Module):
    """A sum used as a divisor, protected by ``+ eps`` (linear attention), and a top-level ``x.float()``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        y = torch.relu(self.fc(x.float()))
        z = y / (y.sum(-1, keepdim=True) + 1e-5)
        w = y / torch.linalg.vector_norm(y, dim=-1, keepdim=True).clamp_min(1e-6)  # a divisor from unknown ops
        return z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) + w


def test_a_divisor_gets_no_quantizer_that_would_round_its_eps_to_zero():
    torch.manual_seed(0)
    m = _Normalized().eval()
    with torch.no_grad():
        m.fc.bias -= 2.0  # many rows all negative: relu gives 0, the divisors are exactly eps
    x = torch.randn(64, 6)
    assert (torch.relu(m.fc(x)) == 0).all(-1).sum() > 5
    sim = QuantSim(m, x, "w8a8")  # top-level x.float(): its quantizer key is not ModuleDict.float
    named = set(sim.quantizers())
    assert "add" not in named and "sqrt" not in named and "add_1" not in named  # the divisors stay float
    assert "clamp_min" not in named
    assert {"truediv", "truediv_1", "pow"} <= named
    sim.calibrate([x], progress=False)
    with torch.no_grad():
        y = sim(x)
    assert torch.isfinite(y).all()
    assert sqnr_db(m(x), y) > 25
