import torch
from torch import nn

from edgequant.nn import ChannelClamp
from edgequant.ptq import absorb_high_biases, cross_layer_equalization
from edgequant.ptq.cle import _in_channel_range


def _spread(model):
    """Give output channels of every conv very different ranges (what CLE is for)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            scale = torch.logspace(-2, 1, m.weight.shape[0])[torch.randperm(m.weight.shape[0], generator=g)]
            m.weight.data.mul_(scale.view(-1, *[1] * (m.weight.ndim - 1)))
    return model.eval()


def test_equalization_is_exact_and_equalizes_ranges_through_relu6_and_depthwise(tiny_net, digits):
    x = digits[2][:64]
    model = _spread(__import__("copy").deepcopy(tiny_net))
    eq, report = cross_layer_equalization(model, x, absorb_high_bias=False)
    assert ("expand.0", "dw.0") in report.pairs and ("dw.0", "project.0") in report.pairs
    assert ("stem.0", "expand.0") not in report.pairs  # stem output feeds the residual add too
    assert isinstance(eq.expand[2], ChannelClamp) and isinstance(eq.dw[2], ChannelClamp)
    assert isinstance(model.expand[2], nn.ReLU6)  # the input model is untouched
    assert report.sqnr_db_scaling > 80  # float-exact up to rounding
    # the chain expand -> dw -> project converged: each pair's ranges match
    for a, b in [("expand.0", "dw.0"), ("dw.0", "project.0")]:
        l1, l2 = eq.get_submodule(a), eq.get_submodule(b)
        r1 = l1.weight.abs().reshape(l1.weight.shape[0], -1).amax(1)
        r2 = _in_channel_range(l2.weight, l2.groups)
        assert torch.allclose(r1, r2, rtol=1e-2)


def test_linear_chain_and_leaky_relu_equalized_exactly():
    model = _spread(nn.Sequential(nn.Linear(6, 8), nn.LeakyReLU(0.1), nn.Linear(8, 3)))
    x = torch.randn(16, 6)
    eq, report = cross_layer_equalization(model, x, fold=False)
    assert report.pairs == [("0", "2")]
    with torch.no_grad():
        assert torch.allclose(model(x), eq(x), rtol=1e-4, atol=1e-5)


def test_high_bias_absorption_moves_bias_and_reports_float_error():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.ReLU6(),
                        nn.Conv2d(4, 4, 3, padding=1)).eval()
    net[1].bias.data.fill_(5.0)  # BN says: pre-activation ~ N(5, gamma^2) -> 5 - 3 gamma always positive
    net[1].weight.data.fill_(0.5)
    x = torch.randn(8, 3, 10, 10)
    eq, report = cross_layer_equalization(net, x)
    assert "0" in report.absorbed and report.absorbed["0"] > 0
    assert "3" not in report.absorbed  # its consumer is zero-padded: the shift cannot be absorbed
    assert report.sqnr_db_scaling > 80 and report.sqnr_db_absorption is not None
    # absorbing again finds nothing new: bn_mean was updated
    _, again = absorb_high_biases(eq)
    assert all(v < 1e-6 for v in again.absorbed.values())


class _SharedAct(nn.Module):
    """Three conv pairs that all call one ReLU6 instance (as some hand-written models do)."""

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU6()
        self.convs = nn.ModuleList(nn.Conv2d(4 if i == 0 else 8, 8, 1) for i in range(4))

    def forward(self, x):
        for conv in self.convs[:-1]:
            x = self.act(conv(x))
        return self.convs[-1](x)


def test_shared_activation_module_is_handled_per_call():
    model = _spread(_SharedAct())
    x = torch.randn(8, 4, 5, 5)
    eq, report = cross_layer_equalization(model, x, absorb_high_bias=False)
    assert len(report.pairs) == 3  # every call site, not only a module called once
    assert len(report.replaced_activations) == 3
    assert isinstance(model.act, nn.ReLU6)  # the input model is untouched
    assert report.sqnr_db_scaling > 80
