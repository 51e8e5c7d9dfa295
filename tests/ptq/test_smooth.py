"""Input smoothing: LayerNorm outliers moved into the weights of the linear layers that read them."""
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgequant import QuantSim, export_onnx
from edgequant.metrics import sqnr_db
from edgequant.nn import ChannelScale
from edgequant.ptq import smooth_linear_inputs


class Block(nn.Module):
    """A post-LN transformer block in miniature: one LayerNorm output read by two linear layers and the
    residual path, with two outlier channels (large LayerNorm gains), as in BERT."""

    def __init__(self, d=32):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        with torch.no_grad():
            self.norm.weight[:2] = 40.0
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, 4)

    def forward(self, x):
        h = self.norm(x)
        return self.out(h + torch.relu(self.a(h)) * self.b(h))


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 6, 32, generator=g) for _ in range(n)]


def test_smoothing_is_exact_in_float_and_leaves_the_model_alone():
    torch.manual_seed(0)
    m = Block().eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    sm, report = smooth_linear_inputs(m, _data(4, 0))
    assert report.groups == {"norm": ["a", "b"]}
    spread_before, spread_after = report.spread["norm"]
    assert spread_after < spread_before / 3
    assert sum(isinstance(x, ChannelScale) for x in sm.modules()) == 1
    x = _data(1, 5)[0]
    with torch.no_grad():
        assert torch.allclose(sm(x), m(x), atol=1e-4)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # the user's model is untouched
    with pytest.raises(ValueError, match="alpha"):
        smooth_linear_inputs(m, _data(1, 0), alpha=1.5)


def test_smoothed_linear_layers_read_8_bit_inputs_and_run_as_integer_gemms(tmp_path):
    torch.manual_seed(0)
    m = Block().eval()
    cal, x = _data(4, 0), _data(1, 9)[0]
    plain = QuantSim(m, cal[0], "w8a8_transformer")  # the LayerNorm output on 16 bits feeds the layers
    sm, _ = smooth_linear_inputs(m, cal)
    sim = QuantSim(sm, cal[0], "w8a8_transformer")
    assert plain.quantizers()["norm"].spec.bits == 16  # read by the layers
    assert "norm" not in sim.quantizers()  # read by the residual add alone: the preset quantizes what products read
    smooth_q = [q for n, q in sim.quantizers().items() if "smooth" in n]
    assert len(smooth_q) == 1 and smooth_q[0].spec.bits == 8  # what the linear layers read
    for s in (plain, sim):
        s.calibrate(cal, progress=False)
    with torch.no_grad():
        ref = m(x)
        assert sqnr_db(ref, sim(x)) > 25
    path = export_onnx(sim, tmp_path / "s.onnx")["onnx"]
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    out = s.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        assert sqnr_db(sim(x), torch.from_numpy(out)) > 30
    kernels = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert kernels.count("QGemm") + kernels.count("MatMulInteger") >= 2  # a and b read 8-bit integers


def test_a_linear_layer_shared_with_another_input_is_not_smoothed():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(self.norm(x)) + self.fc(x)  # fc also reads x itself

    m = Shared().eval()
    sm, report = smooth_linear_inputs(m, [torch.randn(4, 8)])
    assert report.groups == {}
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.allclose(sm(x), m(x))
