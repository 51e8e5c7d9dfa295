"""What PTQ produced reaches deployment: result.model + encodings, sim.save / edgequant.load, and the
user's model comes back exactly as it went in."""
import copy
import os
import stat

import onnx
import pytest
import torch
from torch import nn

import edgequant
from edgequant import QuantSim, QuantSimWarning, export_onnx, quantize


def _batches(x, n=3, size=64):
    return [x[i * size:(i + 1) * size] for i in range(n)]


@pytest.mark.parametrize("stages,recipe", [(["adaround"], "w4a8"), (["bias_correction"], "w8a8_per_tensor"),
                                           (["bn_fold", "cle", "hba", "loss_aware"], "w8a8_per_tensor")])
def test_result_model_and_encodings_reproduce_the_sim(tiny_net, digits, tmp_path, stages, recipe):
    """After AdaRound or bias correction, a fresh sim of result.model with the saved encodings used to
    differ (max |diff| 0.005): the rounded weights and moved biases lived only in the sim."""
    x = digits[0]
    result = quantize(tiny_net, _batches(x), recipe=recipe, ptq=stages, adaround_iterations=20, progress=False)
    sim = result.sim
    sim.save_encodings(tmp_path / "e.json")
    fresh = QuantSim(result.model, x[:1], recipe)
    fresh.load_encodings(tmp_path / "e.json")
    xe = digits[2][:200]
    with torch.no_grad():
        assert torch.equal(fresh(xe), sim(xe))
    # and through one folder: sim.save -> edgequant.load, with the same ONNX export
    sim.save(tmp_path / "saved")
    loaded = edgequant.load(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(loaded(xe), sim(xe))
    a = onnx.load(export_onnx(sim, tmp_path / "a.onnx")["onnx"])
    b = onnx.load(export_onnx(loaded, tmp_path / "b.onnx")["onnx"])
    assert a.graph.SerializeToString() == b.graph.SerializeToString()
    if "bn_fold" in stages:  # the structure changed: the user's architecture does not fit, and load says so
        with pytest.raises(edgequant.PlanError, match="without model="):
            edgequant.load(tmp_path / "saved", model=tiny_net)
    else:
        again = edgequant.load(tmp_path / "saved", model=tiny_net)  # the user's architecture, the saved weights
        with torch.no_grad():
            assert torch.equal(again(xe), sim(xe))


def test_save_keeps_disabled_quantizers_and_replaces_the_folder_whole(tiny_net, digits, tmp_path):
    x = digits[0]
    sim = QuantSim(tiny_net, x[:1], "w8a8")
    sim.calibrate(_batches(x), progress=False)
    off = sim.disable(sim.output_quantizers())
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "stale.txt").write_text("old")
    sim.save(tmp_path / "s")
    assert not (tmp_path / "s" / "stale.txt").exists()  # the folder was swapped, not mixed
    loaded = edgequant.load(tmp_path / "s")
    assert sorted(loaded._disabled) == sorted(off)
    with torch.no_grad():
        assert torch.equal(loaded(x[:50]), sim(x[:50]))
    mode = stat.S_IMODE(os.stat(tmp_path / "s" / "encodings.json").st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # not the 0600 of a temporary file
    with pytest.raises(FileNotFoundError, match="not a saved sim"):
        edgequant.load(tmp_path)


def test_quantize_gives_the_model_back_as_it_came(tiny_net, digits):
    """A BN of the user's model used to be left in train mode after quantize()."""
    model = copy.deepcopy(tiny_net)
    model.eval()
    model.stem[1].train()  # mixed modes, as some fine-tuning code leaves them
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: m.training for n, m in model.named_modules()}
    with pytest.warns(QuantSimWarning, match="train mode"):
        quantize(model, _batches(digits[0]), recipe="w8a8", ptq="auto", progress=False)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    sim = QuantSim(model, digits[0][:1], inplace=True)  # even in place, each module keeps its mode
    assert {n: m.training for n, m in sim.model.named_modules() if n in flags} == \
        {n: f for n, f in flags.items() if n in dict(sim.model.named_modules())}


def test_a_failed_load_of_encodings_changes_nothing(tiny_net, digits, tmp_path):
    x = digits[0]
    a = QuantSim(tiny_net, x[:1], "w8a8")
    a.calibrate(_batches(x), progress=False)
    b = QuantSim(tiny_net, x[:1], "w4a8")  # 4-bit weights: a's activations fit, its weights do not
    b.calibrate(_batches(x, n=1), progress=False)
    a.save_encodings(tmp_path / "a.json")
    state = {k: v.clone() for k, v in b.state_dict().items()}
    with pytest.raises(ValueError, match="does not match"):
        b.load_encodings(tmp_path / "a.json")
    assert all(torch.equal(state[k], v) for k, v in b.state_dict().items())


def test_export_writes_the_onnx_and_its_encodings_together(tiny_net, digits, tmp_path):
    x = digits[0]
    sim = QuantSim(tiny_net, x[:1], "w8a8")
    sim.calibrate(_batches(x), progress=False)
    (tmp_path / "m.onnx").mkdir()
    with pytest.raises(IsADirectoryError, match="folder"):
        export_onnx(sim, tmp_path / "m.onnx")
    assert not (tmp_path / "m.encodings.json").exists()  # nothing half written
    info = export_onnx(sim, tmp_path / "n.onnx")
    assert os.path.exists(info["onnx"]) and os.path.exists(info["encodings"])
    assert not [p for p in os.listdir(tmp_path) if p.endswith((".tmp", ".old"))]


def test_a_dead_channel_keeps_its_bias():
    """An all-zero weight channel got scale 1e-10; its int32 bias on s_in * s_w saturated (0.8 -> 0.0068)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    with torch.no_grad():
        net[0].weight[1].zero_()
        net[0].bias[1] = 0.8
    x = torch.randn(16, 3, 8, 8)
    sim = QuantSim(net, x[:1], "w8a8")
    sim.calibrate([x], progress=False)
    with torch.no_grad():
        y = sim.model.get_submodule("0")(sim.model.activation_quantizers.input(x))
    assert torch.allclose(y[:, 1], torch.full_like(y[:, 1], 0.8), atol=1e-4)
    q = sim.quantizers()["0.weight"]
    assert q.scale[1] == q.scale.max() and q.empty_groups == 1


def test_overrides_that_match_nothing_are_named():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    cfg = edgequant.QuantConfig(module_names={"classifer.*": edgequant.Override(weight=None), "2": edgequant.Override(weight=None)},
                                module_types={"Conv2D": edgequant.Override(weight=None)})
    with pytest.warns(QuantSimWarning) as rec:
        sim = QuantSim(net, torch.randn(1, 3, 8, 8), cfg)
    msgs = " ".join(str(w.message) for w in rec)
    assert "classifer.*" in msgs and "Conv2D" in msgs and "'Conv2d'" in msgs and "module_names['2']" not in msgs
    assert "2.weight" not in sim.quantizers()  # the pattern that does match still applies


def test_calibration_data_mistakes_get_one_clear_error():
    sim = QuantSim(nn.Sequential(nn.Linear(3, 2)), torch.randn(1, 3))
    with pytest.raises(edgequant.DataError, match="data is None"):
        sim.calibrate(None)
    with pytest.raises(edgequant.DataError, match="single tensor"):
        sim.calibrate(torch.randn(8, 3))
    with pytest.raises(edgequant.DataError, match="meta device"):
        QuantSim(nn.Sequential(nn.Linear(3, 2)).to("meta"), torch.randn(1, 3))
    with pytest.warns(QuantSimWarning, match="saw only zeros"):
        sim.calibrate([torch.zeros(4, 3)], progress=False)


def test_calibration_warns_when_most_values_are_clipped():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)).eval()
    cfg = edgequant.QuantConfig(activation=edgequant.QuantSpec(bits=8, symmetric=True, signed=False, range_method="percentile"),
                                input_range_method=None)  # the input on the activation spec: an unsigned grid clips it
    sim = QuantSim(net, torch.randn(1, 8), cfg)
    with pytest.warns(QuantSimWarning, match="clip most"):
        sim.calibrate([torch.randn(64, 8) for _ in range(2)], progress=False)
    assert sim.quantizers()["input"].clipped > 0.3
    ok = QuantSim(net, torch.randn(1, 8), "w8a8")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantSimWarning)
        ok.calibrate([torch.randn(64, 8) for _ in range(2)], progress=False)
    assert ok.quantizers()["input"].clipped < 0.01
