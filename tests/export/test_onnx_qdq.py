import copy
import json
import os
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgequant import NotCalibratedError, QuantSim, export_onnx
from edgequant.config.spec import QuantConfig, QuantSpec
from edgequant.export.onnx_qdq import ExportError
from edgequant.ptq import cross_layer_equalization


def _run_ort(path, x, optimize=True):
    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0], s


def _steps(sim, ort_out, sim_out, name="fc"):
    return np.abs(ort_out - sim_out) / float(sim.quantizers()[name].scale)


@pytest.mark.parametrize("cfg", ["w8a8", "w8a8_per_tensor", "w4a8", "w8a16"])
def test_ort_integer_kernels_match_the_sim(folded, tmp_path, cfg):
    model, x = folded
    sim = QuantSim(model, x[:1], cfg)
    sim.calibrate([x[i:i + 64] for i in range(0, 256, 64)], progress=False)
    info = export_onnx(sim, tmp_path / "m.onnx")
    assert info["opset"] == (21 if cfg in ("w4a8", "w8a16") else 17)
    xe = x[1000:1400]
    o, _ = _run_ort(info["onnx"], xe)
    with torch.no_grad():
        r = sim(xe).numpy()
    d = _steps(sim, o, r)
    assert (o.argmax(1) == r.argmax(1)).all()
    assert (d <= 1.01).mean() >= 0.999  # 1 step, plus float32 rounding (visible on 16-bit grids)
    # the encodings beside it name ONNX tensors one-to-one
    enc = json.loads(open(info["encodings"]).read())
    m = onnx.load(info["onnx"])
    q_inputs = {n.input[0] for n in m.graph.node if n.op_type in ("QuantizeLinear", "Clip")}
    inits = {i.name for i in m.graph.initializer}
    assert set(enc["activations"]) <= q_inputs and set(enc["params"]) <= inits
    # every node's output is read by another node or is a graph output (the model output had a second,
    # dead DequantizeLinear that ONNX Runtime still ran)
    read = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    assert [n.name for n in m.graph.node if not set(n.output) & read] == []


def test_integer_kernels_are_used_and_int8_weights_saturate(folded, tmp_path):
    model, x = folded
    sim = QuantSim(model, x[:1], "w8a8")
    sim.calibrate([x[i:i + 64] for i in range(0, 256, 64)], progress=False)
    info = export_onnx(sim, tmp_path / "m.onnx")
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(info["onnx"], so, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert {"QLinearConv", "QLinearAdd"} <= ops  # ORT runs the convs and the add in integer arithmetic
    # int8 weights are exact in ORT without fusion; the weight encodings are the same either way
    info8 = export_onnx(sim, tmp_path / "m8.onnx", weight_dtype="int8")
    o, _ = _run_ort(info8["onnx"], x[1000:1200], optimize=False)
    with torch.no_grad():
        assert _steps(sim, o, sim(x[1000:1200]).numpy()).max() <= 1 + 1e-3


def test_cle_model_with_channel_clamps_exports(folded, tmp_path):
    model, x = folded
    eq, rep = cross_layer_equalization(model, fold=False)
    assert rep.replaced_activations
    sim = QuantSim(eq, x[:1], "w8a8_per_tensor")
    sim.calibrate([x[i:i + 64] for i in range(0, 256, 64)], progress=False)
    info = export_onnx(sim, tmp_path / "m.onnx")
    o, _ = _run_ort(info["onnx"], x[1000:1200])
    with torch.no_grad():
        r = sim(x[1000:1200]).numpy()
    assert (o.argmax(1) == r.argmax(1)).all() and (_steps(sim, o, r) <= 1 + 1e-3).mean() >= 0.999
    # the per-channel clamps run on the quantized integers, so ORT still fuses every conv into its integer
    # kernel (a float Max/Min before the QuantizeLinear kept two of the five convs in float32)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(info["onnx"], so, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ops["QLinearConv"] == 5 and ops["Conv"] == 0, ops


def test_channel_clamp_inside_the_grid_runs_on_the_integers(tmp_path):
    """A channel clamped inside the output grid gets an integer Min after the QuantizeLinear (the others are left to
    its saturation); ONNX Runtime then computes the integer-exact sim's integers, with the conv fused."""
    from edgequant.nn import ChannelClamp

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), ChannelClamp(torch.zeros(3), torch.tensor([0.5, 6.0, 40.0])),
                        nn.Conv2d(3, 2, 1)).eval()
    x = torch.randn(64, 1, 8, 8) * 3
    sim = QuantSim(net, x[:1], "w8a8_per_tensor")
    sim.calibrate([x[:32], x[32:]], progress=False)
    info = export_onnx(sim, tmp_path / "m.onnx")
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    sess = ort.InferenceSession(info["onnx"], so, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ops["QLinearConv"] == 2 and ops["Min"] == 1 and ops["Max"] == 0 and ops["Conv"] == 0, ops
    xe = torch.randn(16, 1, 8, 8) * 3
    with sim.integer_exact("float32"):
        exact = sim(xe)
    assert torch.equal(exact, torch.from_numpy(sess.run(None, {"input": xe.numpy()})[0]))
    q = sim.quantizers()["1"]
    assert float(q.scale) * (q.qmax - int(q.zero_point)) > 1.0  # the grid reaches past channel 0's bound


def test_export_bad_input(folded, tmp_path):
    model, x = folded
    sim = QuantSim(model, x[:1], "w8a8")
    with pytest.raises(NotCalibratedError, match="calibrate"):
        export_onnx(sim, tmp_path / "m.onnx")
    sim.calibrate([x[:64]], progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(sim, tmp_path / "missing" / "m.onnx")
    assert not os.path.exists(tmp_path / "missing")

    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return torch.special.ndtri(torch.sigmoid(self.conv(x)))  # torch.onnx has no ndtri either

    sim = QuantSim(Weird().eval(), x[:1])
    sim.calibrate([x[:32]], progress=False)
    with pytest.raises(ExportError, match="ndtri"):
        export_onnx(sim, tmp_path / "w.onnx")
    assert not any(p.name.endswith(".onnx") for p in tmp_path.iterdir())


def test_float_export_with_quantization_disabled(folded, tmp_path):
    """With every quantizer disabled the export is the float model (the FP32 baseline of the benchmark)."""
    model, x = folded
    sim = QuantSim(model, x[:1], "w8a8")
    sim.calibrate([x[:64]], progress=False)
    with sim.quantization_disabled():
        info = export_onnx(sim, tmp_path / "fp32.onnx")
    m = onnx.load(info["onnx"])
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node)
    o, _ = _run_ort(info["onnx"], x[1000:1100])
    with torch.no_grad():
        ref = model(x[1000:1100]).numpy()
    assert np.abs(o - ref).max() < 1e-4


def test_a_sim_of_an_unfolded_model_deploys_folded(tmp_path):
    """An export of an unfolded sim ran BN as float ops between Q/DQ pairs (3x slower than FP32 in ORT)
    and the integer engine refused it: the sim now folds batch norms itself, as the runtime does."""
    from edgequant.export.integer import IntegerEngine, IntegerEngineError
    from tests.ptq.conftest import TinyNet, _digits

    torch.manual_seed(0)
    x, _ = _digits()
    net = TinyNet().train()
    with torch.no_grad():  # real BN statistics on real digits, and the user's model keeps its batch norms
        for i in range(0, 512, 64):
            net(x[i:i + 64])
    net.eval()
    data = [x[i:i + 64] for i in range(0, 256, 64)]
    sim = QuantSim(net, x[:1], "w8a8")
    assert len(sim.bn_folding.folded) == 5 and any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    sim.calibrate(data, progress=False)
    info = export_onnx(sim, tmp_path / "m.onnx")
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(info["onnx"]).graph.node}
    xe = x[1000:1200]
    o, _ = _run_ort(info["onnx"], xe)
    with torch.no_grad(), sim.integer_exact():
        assert np.array_equal(o, sim(xe).numpy())  # bit-identical, as built
    kept = QuantSim(net, x[:1], "w8a8", fold_bn=False)  # the other mode, for those who ask
    kept.calibrate(data, progress=False)
    assert "BatchNormalization" in {n.op_type for n in onnx.load(export_onnx(kept, tmp_path / "k.onnx")["onnx"]).graph.node}
    with pytest.raises(IntegerEngineError, match="BatchNorm2d"):  # the integer engine refuses it by name
        IntegerEngine(kept)
    # the user's own (unfolded) architecture takes the sim's weights: its batch norms become identities
    mine = copy.deepcopy(net)
    sim.copy_weights_to(mine)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in mine.modules())
    with torch.no_grad(), sim.quantization_disabled():
        assert torch.equal(mine(xe), sim(xe))
    sim.save(tmp_path / "saved")  # and edgequant.load(folder, model=<the user's architecture>) folds it alike
    import edgequant
    again = edgequant.load(tmp_path / "saved", model=net)
    with torch.no_grad():
        assert torch.equal(again(xe), sim(xe))


class _Pads(nn.Module):
    """A zero pad between two convs (moves integers: the real value 0 is the zero point) and a pad with 1.0 (a new
    value, off the grid: it gets a quantizer)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.b(torch.nn.functional.pad(self.a(x), (1, 2, 0, 1)))
        return self.c(torch.nn.functional.pad(y, (1, 1, 1, 1), value=1.0))


def test_a_zero_pad_moves_integers_and_a_pad_with_another_value_is_quantized(tmp_path):
    from edgequant.export.integer import IntegerEngine

    torch.manual_seed(0)
    cal = [torch.randn(4, 3, 10, 10) for _ in range(2)]
    sim = QuantSim(_Pads().eval(), cal[0], "w8a8")
    names = set(sim.quantizers())
    assert "pad" not in names and "pad_1" in names
    sim.calibrate(cal, progress=False)
    path = export_onnx(sim, tmp_path / "p.onnx")["onnx"]
    g = onnx.load(path).graph
    pads = [n for n in g.node if n.op_type == "Pad"]
    q_out = {n.output[0] for n in g.node if n.op_type == "QuantizeLinear"}
    assert any(p.input[0] in q_out and len(p.input) == 3 for p in pads)  # on the integers, zero point as constant
    x = torch.randn(3, 3, 10, 10)
    out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad(), sim.integer_exact():
        exact = sim(x)
    assert torch.equal(exact, torch.from_numpy(out))
    with pytest.raises(Exception, match="pad_1"):  # the engine moves zero pads but refuses a new value, by name
        IntegerEngine(sim, "float32")


def test_the_integer_engine_pads_with_the_zero_point():
    from edgequant.export.integer import IntegerEngine

    class ZeroPad(_Pads):
        def forward(self, x):
            return self.b(torch.nn.functional.pad(self.a(x), (2, 0, 1, 1)))

    torch.manual_seed(0)
    cal = [torch.randn(4, 3, 10, 10) for _ in range(2)]
    asym = QuantConfig(activation=QuantSpec(bits=8, symmetric=False, range_method="minmax"))  # asymmetric grids
    sim = QuantSim(ZeroPad().eval(), cal[0], asym)
    sim.calibrate(cal, progress=False)
    assert sim.quantizers()["a"].zero_point.item() != 0  # an asymmetric grid: padding with integer 0 would be wrong
    x = torch.randn(3, 3, 10, 10)
    with torch.no_grad(), sim.integer_exact():
        exact = sim(x)
    assert torch.equal(IntegerEngine(sim, "float32")(x), exact)


class _ResizedPositions(nn.Module):
    """A learned position grid resized with antialiasing (timm's NaFlexViT): torch.onnx cannot export the resize, but
    it reads a parameter only, so the export computes it once."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 2, stride=2)
        self.pos = nn.Parameter(torch.randn(1, 6, 6, 8))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        pos = torch.nn.functional.interpolate(self.pos.permute(0, 3, 1, 2), size=(4, 4), mode="bicubic", antialias=True)
        return self.head(self.conv(x) + pos)


def test_ops_on_parameters_only_are_folded_into_initializers(tmp_path):
    torch.manual_seed(0)
    m = _ResizedPositions().eval()
    cal = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    sim = QuantSim(m, cal[0], "w8a8")
    sim.calibrate(cal, progress=False)
    before = sim.model.pos.detach().clone()  # the sim's own parameter: the export computes on a copy
    path = export_onnx(sim, tmp_path / "r.onnx")["onnx"]
    g = onnx.load(path).graph
    assert not {"Resize", "Transpose"} & {n.op_type for n in g.node}
    assert any(i.name.endswith("_folded") for i in g.initializer)
    x = torch.randn(3, 3, 8, 8)
    out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad(), sim.integer_exact():
        assert torch.equal(sim(x), torch.from_numpy(out))
    assert torch.equal(sim.model.pos, before)


class _TableBias(nn.Module):
    """Swin v2's continuous position bias: a quantized MLP on a constant coordinate table, added to the data path."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.linspace(-3, 3, 32).reshape(16, 2))
        self.mlp = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 8, bias=False))
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) + 16 * torch.sigmoid(self.mlp(self.table))


@pytest.mark.parametrize("options", [{}, {"tables": True, "float64": True}])
def test_layers_on_buffers_only_are_computed_by_the_sim_at_export(tmp_path, options):
    torch.manual_seed(0)
    cal = [torch.randn(4, 16, 8) for _ in range(2)]
    sim = QuantSim(_TableBias().eval(), cal[0], "w8a8")
    sim.calibrate(cal, progress=False)
    table = sim.model.table.clone()
    path = export_onnx(sim, tmp_path / "t.onnx", **options)["onnx"]
    g = onnx.load(path).graph
    kinds = Counter(n.op_type for n in g.node)
    assert kinds["Gemm"] == 1 and not {"Relu", "Sigmoid", "Mul", "Gather"} & set(kinds)  # only fc runs; the MLP is an initializer
    q_inputs = {n.input[0] for n in g.node if n.op_type == "QuantizeLinear"}
    assert "mul" in q_inputs and "mlp_2" not in q_inputs  # the quantizer the add reads keeps its name
    x = torch.randn(3, 16, 8)
    out, _ = _run_ort(path, x)
    with torch.no_grad(), sim.integer_exact(**options) as mode:
        assert torch.equal(sim(x), torch.from_numpy(out))
    assert not mode.float_computed  # the MLP is not rerun by ORT's float kernels
    assert torch.equal(sim.model.table, table)
