"""Per-quantizer sensitivity: it must point at the layer that really causes the error, and say why."""
import torch
from torch import nn

from edgequant import QuantSim, analyze


def _net_with_a_bad_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    with torch.no_grad():
        # two channels 100x wider than the rest (the next layer undoes it: the float model is unchanged, as after
        # BN folding in MobileNetV2's depthwise layers): a per-tensor grid starves the other channels
        net[2].weight[:2] *= 100
        net[2].bias[:2] *= 100
        net[4].weight[:, :2] /= 100
    return net


def test_the_culprit_ranks_first_with_the_right_fix():
    net = _net_with_a_bad_layer()
    data = [torch.randn(64, 16) for _ in range(3)]
    report = analyze(net, data, "w8a8_per_tensor", progress=False)
    worst = report.quantizers[0]
    assert worst.name == "2.weight", report.to_markdown()
    assert worst.channel_spread > 20 and "per-channel" in worst.suggestion
    assert worst.only_sqnr_db < report.all_sqnr_db + 3  # alone it costs about as much as everything together
    clean = [q for q in report.quantizers if q.name in ("input", "0.weight", "1", "4")]
    assert len(clean) == 4 and all(q.only_sqnr_db > worst.only_sqnr_db + 20 for q in clean)
    assert report.quantizers[1].name == "3"  # the ReLU output after it carries the same wide channels
    fixed = analyze(net, data, "w8a8", progress=False)  # per-channel weights: the weights' share of the error is gone
    assert fixed.all_sqnr_db > report.all_sqnr_db + 3


def test_a_calibrated_sim_is_analysed_and_left_as_it_was():
    net = _net_with_a_bad_layer()
    data = [torch.randn(64, 16) for _ in range(2)]
    sim = QuantSim(net, data[0], "w8a8")
    sim.calibrate(data, progress=False)
    sim.disable("4")  # the user's choice stays
    before = sim(data[0])
    scores = iter([0.5])
    report = analyze(sim, data, eval_fn=lambda s: next(scores, 1.0), progress=False)
    assert report.score == "eval_fn" and "4" not in {q.name for q in report.quantizers}
    assert torch.equal(sim(data[0]), before) and "4" in sim._disabled
    assert report.to_dict()["quantizers"][0]["name"] in sim.quantizers()
