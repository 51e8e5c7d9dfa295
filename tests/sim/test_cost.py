"""The cost model: MACs, bit operations, memory and energy, per layer and in total."""
import torch
from torch import nn

from edgequant import QuantConfig, QuantSim, QuantSpec
from edgequant.sim.cost import FP32_ADD_PJ, FP32_MULT_PJ


def _net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(),
                         nn.ConvTranspose2d(8, 4, 2, stride=2), nn.Flatten(), nn.Linear(4 * 12 * 12, 5)).eval()


def test_macs_bops_and_memory_by_hand():
    sim = QuantSim(_net(), torch.randn(1, 3, 8, 8), "w8a8")
    c = {lc.name: lc for lc in sim.cost().layers}
    assert c["0"].macs == 8 * 8 * 8 * (3 * 9)  # output elements x (Cin x k x k)
    assert c["2"].macs == 8 * 6 * 6 * 9  # depthwise: Cin/groups = 1
    assert c["4"].macs == 8 * 6 * 6 * (4 * 4)  # transposed: input elements x (Cout x k x k)
    assert c["6"].macs == 5 * 4 * 12 * 12
    assert all(lc.bops == lc.macs * 64 for lc in c.values())
    assert c["6"].weight_bytes == 5 * 576
    w4 = QuantSim(_net(), torch.randn(1, 3, 8, 8), "w4a16").cost()
    assert w4.bops == sum(lc.macs * 4 * 16 for lc in w4.layers) and w4.weight_bytes * 2 == sim.cost().weight_bytes
    assert w4.energy_pj != sim.cost().energy_pj


def test_float_layers_cost_float_and_the_summary_prints_it():
    cfg = QuantConfig(weight=None, activation=QuantSpec(bits=8))
    c = QuantSim(_net(), torch.randn(1, 3, 8, 8), cfg).cost()
    assert {lc.weight_bits for lc in c.layers} == {32}
    assert c.energy_pj > c.macs * (FP32_MULT_PJ + FP32_ADD_PJ)  # float MACs plus memory traffic
    sim = QuantSim(_net(), torch.randn(1, 3, 8, 8), "w8a8")
    assert "M MACs" in sim.summary() and "bit-ops" in sim.summary()


def test_peak_activation_memory_follows_bits():
    x = torch.randn(1, 3, 8, 8)
    p8 = QuantSim(_net(), x, "w8a8").cost().peak_activation_bytes
    p16 = QuantSim(_net(), x, "w8a16").cost().peak_activation_bytes
    # the largest live pair: the depthwise conv's 8x6x6 output, read while the transposed conv writes 4x12x12
    assert p8 == 8 * 6 * 6 + 4 * 12 * 12 and p16 == 2 * p8


def test_costs_are_per_inference_whatever_the_example_batch():
    one = QuantSim(_net(), torch.randn(1, 3, 8, 8), "w8a8").cost()
    many = QuantSim(_net(), torch.randn(16, 3, 8, 8), "w8a8").cost()
    assert many.macs == one.macs and many.peak_activation_bytes == one.peak_activation_bytes
