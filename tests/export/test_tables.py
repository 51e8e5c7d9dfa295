"""Elementwise ops between per-tensor grids as lookup tables: the export's Gather, the integer-exact sim and the
integer engine index one table, so they agree bit for bit; the default export keeps the float op (fast in ORT)."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgequant import QuantSim, export_onnx
from edgequant.core.lut import Grid, table
from edgequant.export.integer import IntegerEngine


class Acts(nn.Module):
    """Conv layers with a non-fusable activation after each: hard-swish, tanh-approximated GELU, SiLU, sigmoid,
    GELU (its quantized output read twice)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in [(3, 8), (8, 8), (8, 8), (8, 8), (8, 4)])
        for m in self.c:
            nn.init.normal_(m.weight, std=0.3, generator=g)
        self.hs, self.gelu = nn.Hardswish(), nn.GELU(approximate="tanh")

    def forward(self, x):
        x = self.hs(self.c[0](x))
        x = self.gelu(self.c[1](x))
        x = torch.nn.functional.silu(self.c[2](x))
        x = torch.sigmoid(self.c[3](x))
        h = torch.nn.functional.gelu(x)
        return self.c[4](h) + h[:, :4]


@pytest.fixture(scope="module")
def sim():
    torch.manual_seed(1)
    cal = [torch.randn(8, 3, 12, 12) for _ in range(4)]
    s = QuantSim(Acts().eval(), cal[0], "w7a8")
    s.calibrate(cal, progress=False)
    return s


def _ops(path):
    """Op types, a table lookup (a Gather from an integer table initializer) counted as ``"table"``."""
    g = onnx.load(path).graph
    tables = {i.name for i in g.initializer if i.name.endswith("_table")}
    return ["table" if n.op_type == "Gather" and n.input[0] in tables else n.op_type for n in g.node]


def test_tables_make_an_integer_only_graph_bit_identical_to_the_exact_sim_and_the_engine(sim, tmp_path):
    x = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    path = export_onnx(sim, tmp_path / "t.onnx", tables=True)["onnx"]
    kinds = _ops(path)
    assert kinds.count("table") == 5
    assert not {"HardSwish", "Sigmoid", "Tanh", "Erf", "Mul"} & set(kinds)
    out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with sim.integer_exact("float32", tables=True):
        exact = sim(x).numpy()
    assert np.array_equal(out, exact)
    assert np.array_equal(IntegerEngine(sim, "float32")(x).numpy(), exact)


def test_the_default_export_keeps_elementwise_ops_in_float(sim, tmp_path):
    kinds = _ops(export_onnx(sim, tmp_path / "f.onnx")["onnx"])
    assert "table" not in kinds and "HardSwish" in kinds and kinds.count("Sigmoid") >= 1


def test_the_engine_runs_tables_like_the_exact_sim():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)
            self.act = nn.Hardswish()

        def forward(self, x):
            return self.b(torch.tanh(self.act(self.a(x))))

    torch.manual_seed(0)
    cal = [torch.randn(8, 3, 10, 10) for _ in range(3)]
    s = QuantSim(Net().eval(), cal[0], "w8a8")
    s.calibrate(cal, progress=False)
    x = torch.randn(8, 3, 10, 10)
    eng = IntegerEngine(s, "float32")
    with s.integer_exact("float32", tables=True):
        assert torch.equal(eng(x), s(x))


def test_a_table_is_refused_where_the_function_is_nan_on_a_code():
    src, dst = Grid(0.1, 10, 0, 255), Grid(0.02, 0, 0, 255)
    t = table(torch.exp, src, dst)
    assert t.shape == (256,) and int(t[0]) == int(round(float(torch.exp(torch.tensor(-1.0))) / 0.02))
    with pytest.raises(ValueError, match="NaN"):
        table(torch.sqrt, src, dst)
