"""The quantization plan as the sim's seam: resolved once, public, serialisable, editable; state kept."""
import pytest
import torch

from edgequant import (EdgequantError, NotCalibratedError, Override, PlanError, QuantConfig, QuantPlan, QuantSim,
                       QuantSpec)

from .test_quantsim import Block, _data, _trained


@pytest.fixture
def block():
    torch.manual_seed(0)
    return _trained(Block())


def test_plan_roles_and_output_range_method(block):
    sim = QuantSim(block, torch.randn(1, 3, 12, 12), "w8a8")
    plan = sim.plan
    assert plan["x"].role == "input" and plan["conv1.weight"].role == "weight"
    assert plan["fc"].role == "output" and plan["fc"].spec.range_method == "minmax"  # outputs calibrate min-max
    assert plan["relu"].role == "activation" and plan["relu"].spec.range_method == "mean_minmax"
    assert plan["relu"].spec.signed is False and plan["conv1.weight"].spec.granularity.axis == 0  # resolved
    assert plan["fc.bias"].role == "bias" and plan["fc.bias"].source == ("adaptive_avg_pool2d", "fc.weight")
    assert sim.output_quantizers() == ["fc"]
    assert set(plan.quantized()) - {"fc.bias", "conv1.bias", "conv2.bias", "skip.bias"} == set(sim.quantizers())


def test_plan_round_trips_and_rebuilds_the_same_sim(block):
    x = torch.randn(1, 3, 12, 12)
    cfg = QuantConfig(module_names={"skip": Override(activation=None)})
    sim = QuantSim(block, x, cfg)
    plan = QuantPlan.from_json(sim.plan.to_json())
    assert plan == sim.plan and plan["skip"].spec is None and "skip" not in sim.quantizers()
    edited = plan.with_spec("conv2.weight", QuantSpec(bits=4, symmetric=True)).with_spec("skip", QuantSpec(bits=8))
    sim2 = QuantSim(block, x, plan=edited)  # the config's default, overridden tensor by tensor by the plan
    assert sim2.quantizers()["conv2.weight"].qmin == -8 and "skip" in sim2.quantizers()
    assert sim2.plan["conv2.weight"].spec.signed is True and sim2.plan["skip"].spec.signed is True  # resolved on edit


def test_plan_errors_are_clear(block):
    x = torch.randn(1, 3, 12, 12)
    plan = QuantSim(block, x).plan
    bad = QuantPlan({**plan, "nope.weight": plan["conv1.weight"]})
    with pytest.raises(PlanError, match="does not have: nope.weight"):
        QuantSim(block, x, plan=bad)
    with pytest.raises(PlanError, match="version"):
        QuantPlan.from_json('{"format": "edgequant.plan", "version": 99, "tensors": {}}')
    with pytest.raises(PlanError, match="not valid JSON"):
        QuantPlan.from_json("{")
    assert issubclass(PlanError, EdgequantError) and issubclass(PlanError, ValueError)


def test_set_spec_rebuilds_the_grid(block):
    """``q.spec = ...`` used to leave qmin at -128: a 4-bit spec still clamped on the 8-bit grid."""
    sim = QuantSim(block, torch.randn(1, 3, 12, 12), "w8a8")
    sim.calibrate(_data(), progress=False)
    q = sim.set_spec("conv2.weight", QuantSpec(bits=4, symmetric=True))
    assert (q.qmin, q.qmax) == (-8, 7) and q.is_initialized  # weights calibrate at once
    assert sim.quantizers()["conv2.weight"] is q and sim.plan["conv2.weight"].spec.bits == 4
    w = sim.model.conv2.weight
    levels = (q(w) / q.scale.view(-1, 1, 1, 1)).round()
    assert levels.min() >= -8 and levels.max() <= 7
    a = sim.set_spec("relu", QuantSpec(bits=16))
    with pytest.raises(NotCalibratedError):  # an activation needs data again
        sim(torch.randn(1, 3, 12, 12))
    sim.calibrate(_data(), progress=False)
    assert a.qmax == 65535 and sim(torch.randn(1, 3, 12, 12)).shape == (1, 5)
    with pytest.raises(KeyError, match="not a quantizer"):
        sim.set_spec("nothing", QuantSpec())


def test_set_spec_on_a_float_tensor_says_how(block):
    sim = QuantSim(block, torch.randn(1, 3, 12, 12), QuantConfig(module_names={"skip": Override(activation=None)}))
    with pytest.raises(PlanError, match="plan=sim.plan.with_spec"):
        sim.set_spec("skip", QuantSpec())


def test_disabled_quantizers_stay_in_the_state_dict(block):
    """A state_dict of a sim with disabled quantizers used to lack their keys: loading it into a fresh
    sim failed (missing keys), and their encodings were lost."""
    x = torch.randn(1, 3, 12, 12)
    sim = QuantSim(block, x)
    sim.calibrate(_data(), progress=False)
    ref = sim(x)
    off = sim.disable(sim.output_quantizers() + ["conv1.weight"])
    sd = sim.state_dict()
    fresh = QuantSim(block, x)
    fresh.load_state_dict(sd)  # strict
    assert torch.equal(fresh(x), ref)
    again = QuantSim(block, x)
    again.disable(off)
    again.load_state_dict(QuantSim(block, x).state_dict() | sd)  # into a sim with the same ones disabled
    again.enable(off)
    assert torch.equal(again(x), ref)
    assert set(sd) == set(fresh.state_dict())


class _Tokens(torch.nn.Module):
    """A transformer block's shape: a residual sum read by a LayerNorm, whose output linear layers read, and an
    attention-like product of two projections."""

    def __init__(self):
        super().__init__()
        self.a, self.q, self.k, self.out = (torch.nn.Linear(8, 8) for _ in range(4))
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x):
        h = self.norm(x + self.a(x))
        scores = self.q(h) @ self.k(h).transpose(-1, -2)
        return self.out(torch.softmax(scores, -1) @ h)


def test_products_placement_quantizes_what_products_read():
    x = torch.randn(2, 5, 8)
    every = QuantSim(_Tokens(), x, "w8a8").plan
    cfg = QuantConfig(activation_placement="products")
    plan = QuantSim(_Tokens(), x, cfg).plan
    quantized = {n for n, e in plan.quantized().items() if e.role in ("activation", "output")}
    assert {"a", "add", "matmul", "out"} <= {n for n, e in every.quantized().items() if e.role != "weight"}
    # q and k (read through a transpose) by the matmul, the norm and the softmax by a product, the context by `out`;
    # not the layer output the add reads, the sum the norm reads, the scores softmax reads, nor the model's output
    assert quantized == {"q", "k", "norm", "softmax", "matmul_1"}
    assert plan["x"].spec is not None  # the model input keeps its quantizer
    kept = QuantConfig(activation_placement="products", module_names={"add": Override(activation=QuantSpec(bits=16))})
    assert QuantSim(_Tokens(), x, kept).plan["add"].spec.bits == 16  # a named override wins
    assert QuantConfig.from_json(cfg.to_json()).activation_placement == "products"
    assert "qk" in {n for n, e in QuantSim(_Split(), x, cfg).plan.quantized().items() if e.role == "activation"}


class _Split(torch.nn.Module):
    """A projection split into two halves that a matmul reads (TinyViT's qkv.split)."""

    def __init__(self):
        super().__init__()
        self.qk = torch.nn.Linear(8, 16)

    def forward(self, x):
        q, k = self.qk(x).split(8, dim=-1)
        return q @ k.transpose(-1, -2)
    with pytest.raises(ValueError, match="activation_placement"):
        QuantConfig(activation_placement="inputs")
