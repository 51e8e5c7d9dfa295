import pytest
import torch
from torch import nn

from edgequant import NotCalibratedError, QuantSim
from edgequant.core.requant import quantize_multiplier, shift_round as requantize
from edgequant.export.integer import IntegerEngine, IntegerEngineError
from edgequant.ptq import cross_layer_equalization



def test_fixed_point_requantization_matches_float_rounding():
    m = torch.tensor([0.3, 1e-4, 0.9999, 3.7e-3])
    m0, n = quantize_multiplier(m)
    assert ((m0 >= 2 ** 30) & (m0 < 2 ** 31)).all()
    assert torch.allclose(m0.double() / 2.0 ** n.double(), m.double(), rtol=2 ** -30)
    acc = torch.randint(-2 ** 24, 2 ** 24, (4, 1000), generator=torch.Generator().manual_seed(0))
    got = requantize(acc, m0[:, None], n[:, None])
    ref = torch.floor(acc.double() * m.double()[:, None] + 0.5)
    assert (got - ref.long()).abs().max() <= 1
    assert (got == ref.long()).double().mean() > 0.999


@pytest.mark.parametrize("cfg,cle", [("w8a8", False), ("w8a8_per_tensor", False), ("w4a8", False), ("w8a8_per_tensor", True)])
def test_integer_engine_agrees_with_the_sim(folded, cfg, cle):
    model, x = folded
    if cle:
        model, _ = cross_layer_equalization(model, fold=False)
    sim = QuantSim(model, x[:1], cfg)
    sim.calibrate([x[i:i + 64] for i in range(0, 256, 64)], progress=False)
    engine = IntegerEngine(sim)
    xe = x[1000:1400]
    out = engine.run(xe)
    q = sim.quantizers()["fc"]
    assert out.q.dtype == torch.int64 and out.q.min() >= q.qmin and out.q.max() <= q.qmax
    with torch.no_grad():
        ref = sim(xe)
    steps = (out.dequantize() - ref).abs() / float(sim.quantizers()["fc"].scale)
    assert (out.dequantize().argmax(1) == ref.argmax(1)).all()
    assert (steps <= 1.001).double().mean() >= 0.999


def test_integer_engine_bad_input(folded):
    model, x = folded
    sim = QuantSim(model, x[:1], "w8a8")
    with pytest.raises(NotCalibratedError):
        IntegerEngine(sim)

    class Soft(nn.Module):  # softmax is not elementwise: no table, no integer kernel
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.act = nn.Softmax(dim=1)

        def forward(self, x):
            return self.act(self.conv(x))

    sim = QuantSim(Soft().eval(), x[:1])
    sim.calibrate([x[:32]], progress=False)
    with pytest.raises(IntegerEngineError, match="Softmax"):
        IntegerEngine(sim)
