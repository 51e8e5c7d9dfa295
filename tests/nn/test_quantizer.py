"""Quantizer modules: the read-only spec, the one factory, and the registry of quantized modules."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgequant import QuantSim, QuantSpec
from edgequant.nn import Quantizer, lookup, make_quantizer, register_quantized
from edgequant.nn import registry


def _q(bits=8):
    return make_quantizer(QuantSpec(bits=bits, symmetric=True, signed=True), torch.Size([5]), "x")


def test_spec_is_read_only():
    """Assigning ``q.spec`` used to leave ``qmin``/``qmax`` at the old grid (a 4-bit spec clamped at -128)."""
    q = _q(8)
    with pytest.raises(AttributeError, match="set_spec"):
        q.spec = QuantSpec(bits=4, symmetric=True, signed=True)
    assert (q.spec.bits, q.qmin, q.qmax) == (8, -128, 127)


def test_factory_builds_the_grid_from_the_spec():
    q = _q(4)
    assert isinstance(q, Quantizer) and (q.qmin, q.qmax) == (-8, 7) and q.role == "activation"
    with pytest.raises(ValueError, match="role"):
        make_quantizer(QuantSpec(bits=8, signed=True), torch.Size([2]), "x", role="bias")


def test_old_pickled_quantizer_state_still_reads_its_spec():
    q = _q(8)
    state = dict(q.__dict__)
    state["spec"] = state.pop("_spec")  # how a quantizer pickled before the read-only spec looks
    fresh = Quantizer.__new__(Quantizer)
    fresh.__setstate__(state)
    assert fresh.spec.bits == 8


class ScaledLinear(nn.Module):
    """A layer edgequant does not know: its own parameter and forward."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return 2 * F.linear(x, self.weight)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = ScaledLinear()

    def forward(self, x):
        return self.body(x)


def test_a_registered_class_is_quantized():
    x = torch.randn(2, 4)
    assert "body.weight" not in QuantSim(Net(), x).quantizers()
    register_quantized(ScaledLinear, {"weight": 0})
    try:
        assert lookup(ScaledLinear).params == {"weight": 0}
        net = Net()
        sim = QuantSim(net, x)
        sim.calibrate([x], progress=False)
        q = sim.quantizers()["body.weight"]
        assert q.scale.shape == (3,)  # per output channel, on the registered axis
        ref = 2 * F.linear(x, q(net.body.weight))
        assert torch.allclose(sim.model.body(x), ref)  # the layer's own forward, with its weight fake-quantized
        assert isinstance(sim.model.body, ScaledLinear)
    finally:
        registry._REGISTRY.pop(ScaledLinear, None)


def test_register_quantized_rejects_a_non_module():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_quantized(int)
