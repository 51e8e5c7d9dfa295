"""Arithmetic written once in core/: learned rounding, bias integers, grid ranges, the storage offset."""
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgequant import QuantConfig, QuantSim, QuantSpec, export_onnx
from edgequant.core import PerChannel, resolve_axis
from edgequant.core.granularity import expand_param
from edgequant.core.quant import bias_integers, bias_scale, fake_quantize, grid_range, storage_offset


def test_learned_rounding_is_a_parameter_of_the_formula():
    torch.manual_seed(0)
    w, s, z = torch.randn(4, 9), torch.rand(4) * 0.1 + 0.01, torch.zeros(4, dtype=torch.int32)
    g = PerChannel(0)
    sx = expand_param(s, w.shape, g)
    nearest = torch.round(w / sx) - torch.floor(w / sx)
    assert torch.equal(fake_quantize(w, s, z, -8, 7, g, rounding=nearest), fake_quantize(w, s, z, -8, 7, g))
    h = torch.full_like(w, 0.5, requires_grad=True)
    fake_quantize(w, s, z, -8, 7, g, rounding=h).sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0  # gradients reach the rounding, as AdaRound needs


def test_bias_grid_written_once():
    s_w = torch.tensor([0.5, 0.25])
    assert torch.equal(bias_scale(0.1, s_w, 2), torch.tensor(0.1, dtype=torch.float64) * s_w.double())  # float64 product
    s = bias_scale(torch.tensor(0.1), s_w, 4)  # a grouped transposed conv: per-group scales repeat
    assert s.dtype == torch.float64 and s.shape == (4,) and s[2] == s[0]
    b = bias_integers(torch.tensor([1.0, -1e12]), bias_scale(0.5, torch.tensor(1.0), 2))
    assert b.tolist() == [2, -(2 ** 31)]  # rounded, and saturated on the int32 grid


def test_grid_range():
    lo, hi = grid_range(torch.tensor([0.5, 1.0]), torch.tensor([3, 0]), -8, 7)
    assert lo.tolist() == [-5.5, -8.0] and hi.tolist() == [2.0, 7.0]


def test_axis_error_names_a_function_that_exists():
    with pytest.raises(ValueError, match="resolve_axis") as e:
        PerChannel().param_shape(torch.Size([3, 4]))
    assert "with_axis" not in str(e.value) and resolve_axis(PerChannel(), 0) == PerChannel(0)


@pytest.mark.parametrize("bits", [3, 6, 7, 8])
def test_export_stores_signed_activation_grids_with_the_core_offset(bits, tmp_path):
    """The ONNX export and the float32 requantization used to disagree on the +128 shift of signed
    2-3 and 5-7-bit activation grids (the export shifted them, requant.deployed_offset did not)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(8, 1, 8, 8)
    cfg = QuantConfig(activation=QuantSpec(bits=bits, signed=True))
    sim = QuantSim(net, x[:1], cfg)
    sim.calibrate([x], progress=False)
    model = onnx.load(export_onnx(sim, tmp_path / "m.onnx", opset=21)["onnx"])
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for name, q in sim.quantizers().items():
        if q.is_weight:
            continue
        stored = inits[f"{name}_zero_point"]
        assert stored.dtype == np.uint8
        assert int(stored) - int(q.zero_point) == storage_offset(bits, True) == 128
