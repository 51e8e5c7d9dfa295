import pytest
import torch
from torch import nn

from edgequant import QuantSim
from edgequant.ptq import fold_batch_norms


def _randomize_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.1)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def _rel_err(a, b):
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("layer,bn,shape", [
    (nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), (2, 3, 9, 9)),
    (nn.Conv2d(8, 8, 3, groups=4), nn.BatchNorm2d(8), (2, 8, 9, 9)),
    (nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6), (2, 3, 11)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2), nn.BatchNorm2d(6), (2, 4, 5, 5)),
    (nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6), (2, 4, 5, 5)),
    (nn.Linear(5, 7), nn.BatchNorm1d(7), (4, 5)),
])
def test_folding_is_exact(layer, bn, shape):
    model = _randomize_bn(nn.Sequential(layer, bn, nn.ReLU()))
    x = torch.randn(*shape)
    folded, report = fold_batch_norms(model)
    assert report.folded == [("0", "1")] and not report.skipped
    assert isinstance(folded[1], nn.Identity)
    assert isinstance(model[1], nn.BatchNorm2d | nn.BatchNorm1d)  # the user's model is untouched
    with torch.no_grad():
        assert _rel_err(model(x), folded(x)) < 1e-5
    assert torch.allclose(folded[0].bn_mean, model[1].bias)  # N(beta, gamma^2) kept for data-free passes
    assert "0.bn_mean" not in folded.state_dict()  # non-persistent: state_dict keys are unchanged


def test_fold_through_identity_ops_and_skip_unfoldable():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.drop = nn.Dropout(0.5)
            self.bn = nn.BatchNorm2d(4)
            self.relu = nn.ReLU()
            self.bn2 = nn.BatchNorm2d(4)  # after a ReLU: cannot fold
            self.conv2 = nn.Conv2d(4, 4, 1)
            self.bn3 = nn.BatchNorm2d(4)  # conv2's output is also used by the add: cannot fold

        def forward(self, x):
            y = self.bn2(self.relu(self.bn(self.drop(self.conv(x)))))
            z = self.conv2(y)
            return self.bn3(z) + z

    model = _randomize_bn(Net())
    x = torch.randn(2, 3, 8, 8)
    folded, report = fold_batch_norms(model)
    assert report.folded == [("conv", "bn")]
    reasons = dict(report.skipped)
    assert "not a conv/linear" in reasons["bn2"] and "used elsewhere" in reasons["bn3"]
    with torch.no_grad():
        assert _rel_err(model(x), folded(x)) < 1e-5


def test_fold_rejects_a_sim():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    sim = QuantSim(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(TypeError, match="before building the QuantSim"):
        fold_batch_norms(sim)
