"""Op records and graph patterns: what the passes look for, written once."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from edgequant.graph import ops, patterns


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.act = nn.ReLU6()
        self.c2 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.act(self.bn(self.c1(x)))
        y = F.relu(self.c2(y) + y)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def _graph():
    gm, modules = patterns.trace(Net().eval())
    return gm, modules, {n.name: n for n in gm.graph.nodes}


def test_op_records():
    assert ops.module_op(nn.Conv2d(1, 1, 1)) is ops.WEIGHTED
    assert ops.module_op(nn.ReLU6()).fusable and ops.is_nonneg_module(nn.ReLU6())
    assert not ops.is_nonneg_module(nn.Hardtanh(-1.0, 1.0)) and ops.is_nonneg_module(nn.Hardtanh(0.0, 2.0))
    assert ops.module_op(nn.MaxPool2d(2)).keeps_grid and not ops.module_op(nn.MaxPool2d(2)).identity
    assert ops.module_op(nn.Dropout()).identity
    assert ops.FUNCTION_OPS[torch.add] is ops.ADD and ops.METHOD_OPS["add_"].lowering is None
    assert ops.module_op(nn.LSTM(2, 2)) is ops.WEIGHTED  # registered: a quantized twin (edgequant.nn.rnn)
    assert ops.module_op(nn.Transformer(8, 2, 1, 1, 16)) is None  # unknown: stays in float


def test_supergroups_bn_chains_and_bounds():
    gm, modules, n = _graph()
    assert patterns.in_supergroup(n["c1"], modules)  # conv -> bn
    assert patterns.in_supergroup(n["bn"], modules)  # bn -> ReLU6
    assert not patterns.in_supergroup(n["act"], modules)
    assert patterns.in_supergroup(n["add"], modules)  # add -> relu
    assert patterns.bn_producer(n["bn"], modules) == (n["c1"], True)
    assert patterns.activation_bounds(n["act"], modules) == (0.0, 6.0)
    assert patterns.activation_bounds(n["relu"], modules) == (0.0, math.inf)
    assert patterns.activation_bounds(n["c2"], modules) is None
    assert patterns.split_producer(n["relu"], modules) == (n["add"], n["relu"])
    assert patterns.is_global_pool(n["adaptive_avg_pool2d"], modules)


def test_equalization_pairs_go_through_one_activation():
    gm, modules, _ = _graph()
    assert patterns.equalization_pairs(gm, modules) == []  # c1 -> bn is no activation; y feeds c2 and the add
    from edgequant.ptq import fold_batch_norms
    seq = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(), nn.Dropout(), nn.Conv2d(8, 4, 1)).eval()
    gm, modules = patterns.trace(fold_batch_norms(seq)[0])
    assert [(p.first, p.second, p.act_kind) for p in patterns.equalization_pairs(gm, modules)] == [("0", "4", "clamp")]


def test_a_mean_over_every_dimension_calibrates_and_exports(tmp_path):
    """``x.mean()`` (no dims) is a global average pool over every dimension: calibration's pool-grid cap used to
    crash on it (``list(None)``)."""
    import onnxruntime as ort

    from edgequant import QuantSim, export_onnx

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return y - y.mean()

    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    sim = QuantSim(Net().eval(), x, "w8a8")
    sim.calibrate([x], progress=False)
    path = export_onnx(sim, tmp_path / "m.onnx")["onnx"]
    out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(out), sim(x), atol=float(sim.quantizers()["sub"].scale) * 1.01)
