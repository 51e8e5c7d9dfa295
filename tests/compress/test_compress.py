"""Compression by low-rank factorization: exact at full rank, the whole-model target met, a plain module out."""
import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import edgequant as eq
from edgequant.compress import compress, layer_macs, layer_shapes, spatial_svd, weight_svd
from edgequant.compress.svd import rank_for_ratio, svd_rank_limit
from edgequant.solvers import multiple_choice_knapsack


@pytest.mark.parametrize("conv", [nn.Conv2d(6, 10, 3, padding=1), nn.Conv2d(6, 10, (3, 5), stride=2, padding=(1, 2)),
                                  nn.Conv2d(6, 10, 3, stride=(2, 1), padding=2, dilation=2, bias=False)], ids=["3x3", "3x5-s2", "dilated"])
def test_spatial_svd_at_full_rank_is_the_same_conv(conv):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 15, 17)
    two = spatial_svd(conv, svd_rank_limit(conv))
    assert [type(m) for m in two] == [nn.Conv2d, nn.Conv2d] and two[0].kernel_size[1] == 1 and two[1].kernel_size[0] == 1
    torch.testing.assert_close(two(x), conv(x), atol=2e-5, rtol=1e-4)


def test_weight_svd_of_linear_and_1x1_conv_and_the_rank_error_falls():
    torch.manual_seed(1)
    lin, pw = nn.Linear(40, 24), nn.Conv2d(16, 32, 1, stride=2)
    x, y = torch.randn(3, 7, 40), torch.randn(2, 16, 9, 9)
    torch.testing.assert_close(weight_svd(lin, 24)(x), lin(x), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(weight_svd(pw, 16)(y), pw(y), atol=2e-5, rtol=1e-4)
    errors = [float((weight_svd(lin, r)(x) - lin(x)).detach().pow(2).mean()) for r in (4, 8, 16)]
    assert errors[0] > errors[1] > errors[2]
    assert weight_svd(lin, 5, multiple=8)[0].out_features == 8  # ranks round up to the hardware's multiple


def test_data_aware_weight_svd_keeps_what_the_inputs_use():
    from edgequant.compress.select import input_grams
    from edgequant.compress.svd import layer_input
    torch.manual_seed(2)
    lin, pw = nn.Linear(32, 24), nn.Conv2d(32, 24, 1, stride=2)
    mix = torch.randn(32, 6) @ torch.randn(6, 32) + 0.05 * torch.randn(32, 32)  # inputs live near a 6-dim subspace
    x = torch.randn(256, 32) @ mix + 0.3
    img = (torch.randn(4, 9, 9, 32) @ mix).permute(0, 3, 1, 2).contiguous()
    for layer, data in ((lin, x), (pw, img)):
        gram = input_grams(nn.Sequential(layer), ["0"], [data])["0"]
        rows = layer_input(layer, data)
        assert rows.shape[1] == 32 and torch.allclose(gram, (rows.double().T @ rows.double()) / len(rows))
        out = layer(data).detach()
        plain = float((weight_svd(layer, 6)(data) - out).detach().pow(2).mean())
        aware = float((weight_svd(layer, 6, gram=gram)(data) - out).detach().pow(2).mean())
        assert aware < 0.1 * plain  # the rank goes to the directions the inputs occupy
        torch.testing.assert_close(weight_svd(layer, 24, gram=gram)(data), out, atol=1e-4, rtol=1e-3)  # full rank: same


def test_multiple_choice_knapsack_is_exact_on_a_small_case():
    import itertools
    rng = np.random.default_rng(0)
    options = [[(0.0, 0.0)] + [(float(rng.random()), float(rng.integers(1, 20))) for _ in range(3)] for _ in range(5)]
    need = 30
    pick = multiple_choice_knapsack(options, need, resolution=10000)
    best = min((sum(o[j][0] for o, j in zip(options, c)), c) for c in itertools.product(range(4), repeat=5)
               if sum(o[j][1] for o, j in zip(options, c)) >= need)
    assert sum(options[i][j][1] for i, j in enumerate(pick)) >= need
    assert abs(sum(options[i][j][0] for i, j in enumerate(pick)) - best[0]) < 1e-9


def _net():
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


@pytest.mark.parametrize("solver", ["knapsack", "greedy"])
def test_compress_meets_the_target_and_leaves_a_plain_exportable_model(tmp_path, solver):
    model = _net()
    before = copy.deepcopy(model.state_dict())
    data = [torch.randn(8, 3, 16, 16) for _ in range(3)]
    res = compress(model, data, target=0.6, solver=solver, min_macs=0.0, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model is not modified
    assert res.macs_after <= 0.6 * res.macs_before
    shapes = layer_shapes(res.model, data[0][:1])  # the MACs the report claims are those the new model runs
    mods = dict(res.model.named_modules())
    assert sum(layer_macs(mods[n], s) for n, s in shapes.items()) == res.macs_after
    assert set(res.curves) == {"0", "2", "4", "8"} and all(len(c) == 9 for c in res.curves.values())
    sim = eq.QuantSim(res.model, data[0][:1], "w8a8")
    sim.calibrate(data, progress=False)
    assert sim.capture_mode == "graph"
    eq.export_onnx(sim, tmp_path / "c.onnx")
    s = ort.InferenceSession(str(tmp_path / "c.onnx"), providers=["CPUExecutionProvider"])
    got = s.run(None, {s.get_inputs()[0].name: data[1].numpy()})[0]
    with torch.no_grad():
        assert (got.argmax(1) == sim(data[1]).numpy().argmax(1)).mean() >= 0.85


def test_manual_ratios_parameters_target_and_clear_errors():
    model = _net()
    data = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    res = compress(model, data, manual={"2": 0.5}, layers=["2"], progress=False)
    chosen = {c.name: c for c in res.layers}
    assert chosen["2"].rank == rank_for_ratio(model[2], 0.5) and isinstance(res.model[2], nn.Sequential)
    p = compress(model, data, target=0.7, what="params", min_macs=0.0, progress=False)
    assert p.params_after <= 0.7 * p.params_before
    with pytest.raises(ValueError, match="not factorable"):
        compress(model, data, layers=["1"], progress=False)
    with pytest.raises(ValueError, match="target must be"):
        compress(model, data, target=1.5, progress=False)


class _Inverted(nn.Module):
    """conv -> bn -> relu6 -> depthwise -> relu6 -> conv, plus a residual branch whose channels are shared."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.expand, self.bn, self.act = nn.Conv2d(8, 32, 1), nn.BatchNorm2d(32), nn.ReLU6()
        self.dw, self.act2 = nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU6()
        self.project = nn.Conv2d(32, 8, 1)
        self.head = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x):
        s = self.stem(x)
        return self.head(s + self.project(self.act2(self.dw(self.act(self.bn(self.expand(s)))))))


def test_channel_pruning_follows_the_chain_reconstructs_and_meets_the_target(tmp_path):
    from edgequant.compress.prune import apply_pruning, prunable_chains, reconstruct
    torch.manual_seed(3)
    model = _Inverted().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(4, 3, 12, 12)
    chains = prunable_chains(model, x[:1])
    assert set(chains) == {"project"}  # the stem's channels feed the add too: shared, left alone
    c = chains["project"]
    assert (c.producer, c.through, c.channels) == ("expand", ["bn", "act", "dw", "act2"], 32)
    pruned = copy.deepcopy(model)
    keep = torch.arange(0, 32, 2)
    apply_pruning(pruned, c, keep)
    assert (pruned.expand.out_channels, pruned.bn.num_features, pruned.dw.groups, pruned.project.in_channels) == (16, 16, 16, 16)
    data = [torch.randn(8, 3, 12, 12) for _ in range(4)]
    before = float((pruned(data[0]) - model(data[0])).pow(2).mean())
    reconstruct(pruned, model, c, data, keep)
    assert float((pruned(data[0]) - model(data[0])).detach().pow(2).mean()) < 0.5 * before  # the refit pays off
    res = compress(model, data, target=0.8, method="prune", progress=False)
    assert res.macs_after <= 0.8 * res.macs_before and res.model.project.in_channels < 32
    sim = eq.QuantSim(res.model, data[0][:1], "w8a8")
    sim.calibrate(data, progress=False)
    eq.export_onnx(sim, tmp_path / "p.onnx")  # a plain model: quantized and exported like any other


def test_kept_channels_round_to_the_hardware_multiple():
    from edgequant.compress.prune import kept_channels
    assert [kept_channels(r, 32) for r in (0.5, 0.52, 0.01, 1.0)] == [16, 17, 1, 32]
    assert [kept_channels(r, 32, 8) for r in (0.5, 0.52, 0.01, 0.99)] == [16, 24, 8, 32]
    assert kept_channels(0.3, 20, 16) == 16 and kept_channels(0.9, 20, 16) == 20  # never above the layer's count
    torch.manual_seed(3)
    data = [torch.randn(8, 3, 12, 12) for _ in range(4)]
    res = compress(_Inverted().eval(), data, target=0.8, method="prune", multiple=8, progress=False)
    assert res.model.project.in_channels % 8 == 0 and res.model.project.in_channels < 32
