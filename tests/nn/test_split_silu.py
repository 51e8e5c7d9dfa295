"""SiLU split into sigmoid and multiply: same float model, integer kernels in ONNX Runtime, still bit-exact."""
import onnx
import onnxruntime as ort
import torch
from torch import nn

from edgequant import QuantSim, export_onnx
from edgequant.metrics import sqnr_db
from edgequant.nn import SigmoidMul, split_silu


class SE(nn.Module):
    """An EfficientNet-style block: SiLU activations and a squeeze-excitation gate."""

    def __init__(self):
        super().__init__()
        self.c1, self.act = nn.Conv2d(3, 16, 3, padding=1), nn.SiLU()
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pool, self.fc1, self.fc2 = nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.act2, self.gate, self.out = nn.SiLU(), nn.Sigmoid(), nn.Conv2d(16, 8, 1)

    def forward(self, x):
        h = self.act(self.dw(self.act(self.c1(x))))
        return self.out(h * self.gate(self.fc2(self.act2(self.fc1(self.pool(h))))))


def test_split_silu_runs_as_integer_kernels_and_stays_bit_exact(tmp_path):
    torch.manual_seed(0)
    m = SE().eval()
    split = split_silu(m)
    assert sum(isinstance(x, SigmoidMul) for x in split.modules()) == 2 and isinstance(m.act, nn.SiLU)  # a copy
    cal, x = [torch.randn(8, 3, 16, 16) for _ in range(4)], torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(split(x), m(x), atol=1e-6)
    sim = QuantSim(split, cal[0], "w8a8")
    sim.calibrate(cal, progress=False)
    assert "act.sigmoid" in sim.quantizers()  # the sigmoid inside the SiLU has its own grid
    with torch.no_grad():
        assert sqnr_db(m(x), sim(x)) > 30
    path = export_onnx(sim, tmp_path / "se.onnx")["onnx"]
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    out = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    kernels = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert kernels.count("QLinearSigmoid") >= 2 and kernels.count("QLinearMul") >= 2 and "Sigmoid" not in kernels
    with torch.no_grad(), sim.integer_exact():
        assert (sim(x).numpy() == out).all()


def test_quantize_auto_splits_silu():
    import edgequant

    torch.manual_seed(0)
    m = SE().eval()
    data = [torch.randn(16, 3, 16, 16) for _ in range(6)]
    res = edgequant.quantize(m, data, "w8a8", ptq="auto", progress=False)
    stage = next(s for s in res.report.stages if s.name == "split_silu")
    assert stage.kept, res.report.to_markdown()
    assert "act.sigmoid" in res.sim.quantizers() and isinstance(m.act, nn.SiLU)  # the user's model is untouched
