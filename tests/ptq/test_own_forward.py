"""Layers that subclass a torch layer but compute in their own forward (TensorFlow's "same" padding,
weight standardization) go through every pass and the export without being silently mis-modelled."""
import math

import numpy as np

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgequant
from edgequant import QuantSim, export_onnx
from edgequant.errors import ExportError, IntegerEngineError
from edgequant.export.integer import IntegerEngine
from edgequant.metrics import sqnr_db
from edgequant.nn import own_forward
from edgequant.ptq import adaround, cross_layer_equalization, fold_batch_norms


class SamePadConv(nn.Conv2d):
    def forward(self, x):
        ih, iw = x.shape[-2:]
        ph = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - ih, 0)
        pw = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv(nn.Conv2d):
    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(SamePadConv(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), StdConv(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def test_predicate():
    net = _net()
    assert own_forward(net[0]) and own_forward(net[3]) and not own_forward(net[6]) and not own_forward(nn.Linear(2, 2))


def test_every_pass_keeps_the_float_model_and_skips_by_name():
    """Passes run on the user's model itself skip such layers by name (the sim rewrites them, below)."""
    net, x = _net(), torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        ref = net(x)
    folded, report = fold_batch_norms(net)
    assert {name for name, _ in report.skipped} == {"1", "4"} and all("own forward" in why for _, why in report.skipped)
    eq, _ = cross_layer_equalization(net, x)
    with torch.no_grad():
        assert sqnr_db(ref, folded(x)) > 80 and sqnr_db(ref, eq(x)) > 80


class Opaque(nn.Conv2d):
    """An own forward that is not a padding plus a conv: left as it is, skipped by name."""

    def forward(self, x):
        return torch.tanh(super().forward(x))


def test_the_sim_rewrites_same_padding_and_weight_standardization_as_plain_convs(tmp_path):
    """timm's Conv2dSame / StdConv2d: the sim holds them as plain convs with the effective weight (per-side
    padding in a PaddedConv2d), so BN folding, AdaRound, the export and the integer engine all run on them."""
    net, x = _net(), torch.randn(8, 3, 16, 16)  # 16 at stride 2: TensorFlow's "same" pads (0, 1)
    with torch.no_grad():
        ref = net(x)
    sim = QuantSim(net, x[:1], "w4a8")
    assert set(sim.plain_convs) == {"0", "3"} and "PaddedConv2d pads (0, 1, 0, 1)" in sim.plain_convs["0"]
    assert len(sim.bn_folding.folded) == 2
    with torch.no_grad(), sim.quantization_disabled():
        assert sqnr_db(ref, sim(x)) > 60
    with torch.no_grad():
        assert sqnr_db(ref, sim.float_model()(x)) > 60
        copied = sim.copy_weights_to(_net())
        assert sqnr_db(ref, copied(x)) > 60
    sim.calibrate([x], progress=False)
    r = adaround(sim, [x], iterations=3, progress=False)
    assert not r.skipped
    res = edgequant.quantize(net, [x, x], "w4a8", progress=False, adaround_iterations=3)  # ptq="auto" runs through
    assert res.report.stages
    export_onnx(sim, tmp_path / "m.onnx")
    import onnxruntime as ort

    s = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    o = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad(), sim.integer_exact():
        assert np.array_equal(sim(x).numpy(), o)
    engine = IntegerEngine(sim)
    with torch.no_grad(), sim.integer_exact():
        assert np.array_equal(engine.run(x).dequantize().float().numpy(), sim(x).numpy())


def test_an_own_forward_that_is_not_a_padded_conv_is_refused_by_name(tmp_path):
    x = torch.randn(4, 3, 15, 15)
    sim = QuantSim(nn.Sequential(Opaque(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval(), x[:1], "w8a8")
    assert not sim.plain_convs
    sim.calibrate([x], progress=False)
    with pytest.raises(ExportError, match="own forward"):
        export_onnx(sim, tmp_path / "m.onnx")
    with pytest.raises(IntegerEngineError, match="0: .*own forward"):
        IntegerEngine(sim)
    assert set(adaround(sim, [x], iterations=3, progress=False).skipped) == {"0"}
    with torch.no_grad(), sim.integer_exact():  # it fake-quantizes as in the float sim
        y = sim(x)
    with torch.no_grad():
        assert sqnr_db(sim(x), y) > 30

class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: the batch norm, then its child modules (dropout, activation) in its own forward."""

    def __init__(self, c):
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.drop(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                               False, 0.0, self.eps)))


class CastingLinear(nn.Linear):
    """timm's Linear: its own forward computes what nn.Linear computes."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = BatchNormAct(6)
        self.norm = BatchNormAct(9)  # after a concat: nothing to fold into
        self.head = CastingLinear(9, 5)

    def forward(self, x):
        y = self.norm(torch.cat([self.bn(self.conv(x)), x], 1))
        return self.head(y.mean((2, 3)))


def _cat_net():
    torch.manual_seed(0)
    net = Cat().eval()
    for bn in (net.bn, net.norm):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-1, 1)
    return net


def test_a_subclass_that_computes_as_its_base_is_a_plain_layer():
    assert not own_forward(CastingLinear(4, 3)) and own_forward(BatchNormAct(4))
    relu_free = BatchNormAct(4)
    relu_free.act = nn.Identity()  # then it is a plain batch norm
    assert not own_forward(relu_free)


def test_batch_norm_with_activation_folds_and_keeps_the_activation(tmp_path):
    """Folding such a batch norm into its conv used to replace it with nn.Identity, dropping the ReLU; exporting
    the one it cannot fold wrote a plain BatchNormalization (no ReLU) while the sim ran the ReLU."""
    net, x = _cat_net(), torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        ref = net(x)
    folded, report = fold_batch_norms(net)
    assert report.folded == [("conv", "bn")] and [b for b, _ in report.skipped] == ["norm"]
    assert isinstance(folded.bn, nn.Sequential) and isinstance(folded.bn.act, nn.ReLU)
    sim = QuantSim(net, x[:1], "w8a8")
    with torch.no_grad(), sim.quantization_disabled():
        assert sqnr_db(ref, sim(x)) > 80
    with torch.no_grad():
        assert sqnr_db(ref, sim.float_model()(x)) > 80
    sim.calibrate([x], progress=False)
    export_onnx(sim, tmp_path / "m.onnx")
    import onnxruntime as ort

    s = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    o = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert sqnr_db(sim(x), torch.from_numpy(o)) > 35
