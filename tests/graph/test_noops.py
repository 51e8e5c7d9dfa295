"""Arithmetic that changes nothing (``x * 1``, ``x + 0``) leaves the captured graph."""
import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from edgequant import QuantSim, export_onnx


class Scaled(nn.Module):
    """NF-ResNet's block input, ``act(x) * beta`` with ``beta == 1.0``, read by two convs (as its residual branch and
    its shortcut read it), and the other neutral forms."""

    def __init__(self, beta=1.0):
        super().__init__()
        self.beta = beta
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.a = nn.Conv2d(8, 8, 1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.act(self.stem(x)) * self.beta
        return (self.a(y) / 1 + 0) + (0 + self.b(y) - 0)


def test_neutral_arithmetic_gets_no_quantizer_and_ort_computes_what_the_sim_does(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    sim = QuantSim(Scaled().eval(), x[:1], "w8a8")
    sim.calibrate([x], progress=False)
    names = set(sim.quantizers())
    # the ReLU's unsigned grid reaches both convs: no second, signed grid for ``* 1.0``
    assert not any(n.startswith(("mul", "truediv", "sub")) for n in names), sorted(names)
    assert "act" in names and len([n for n in names if n.startswith("add")]) == 1
    export_onnx(sim, tmp_path / "m.onnx")
    s = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad(), sim.integer_exact():
        ref = sim(x).numpy()
    # with the mul kept, ONNX Runtime dropped it and merged the two Q/DQ pairs into one grid of its own
    np.testing.assert_array_equal(got, ref)


def test_a_real_scaling_keeps_its_quantizer_and_the_graph_computes_the_model():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    for beta, kept in ((0.5, True), (1.0, False)):
        model = Scaled(beta).eval()
        sim = QuantSim(model, x[:1], "w8a8")
        assert ("mul" in sim.quantizers()) is kept
        sim.disable()
        with torch.no_grad():
            torch.testing.assert_close(sim(x), model(x), rtol=0, atol=0)


class _RelPos(nn.Module):
    """MViTv2's attention: relative positions added in place into a view of the scores before the softmax."""

    def __init__(self, whole):
        super().__init__()
        self.whole = whole
        self.q, self.k, self.pos = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 6)

    def forward(self, x):
        attn = self.q(x) @ self.k(x).transpose(-2, -1)
        if self.whole:
            attn.copy_(attn + self.pos(x)[..., :1])
        else:
            attn[:, 1:, 1:] = attn[:, 1:, 1:] + self.pos(x)[:, 1:, 1:]
        return attn.softmax(dim=-1)


def test_in_place_writes_reach_the_ops_after_them_in_the_export(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 6, 8)
    for whole in (False, True):
        model = _RelPos(whole).eval()
        sim = QuantSim(model, x[:1], "w8a8")
        sim.calibrate([x], progress=False)
        export_onnx(sim, tmp_path / "r.onnx", float64=True)
        s = ort.InferenceSession(str(tmp_path / "r.onnx"), providers=["CPUExecutionProvider"])
        got = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad(), sim.integer_exact(float64=True):
            ref = sim(x).numpy()
        # the softmax read the scores as they were before the write
        np.testing.assert_array_equal(got, ref)
        sim.disable()
        with torch.no_grad():
            torch.testing.assert_close(sim(x), model(x))
