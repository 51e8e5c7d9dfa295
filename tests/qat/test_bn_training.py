"""QAT with batch norms kept in training: folding simulated per batch, statistics frozen, then folded for good."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import edgequant as eq
from edgequant.qat import finetune, fold_simulated_bn, prepare_qat, simulate_bn_folding


def _net():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return m.eval()


def _sim(model, data):
    sim = eq.QuantSim(model, data[0][:1], "w8a8", fold_bn=False)
    report = simulate_bn_folding(sim, freeze_bn_after=3)
    sim.calibrate(data, progress=False)
    return sim, report


def test_training_uses_batch_statistics_and_eval_is_the_folded_layer():
    model, data = _net(), [torch.randn(8, 3, 10, 10) for _ in range(3)]
    sim, report = _sim(model, data)
    assert report.pairs == [("0", "1"), ("3", "4")] and not report.skipped
    folded = eq.QuantSim(model, data[0][:1], "w8a8")  # static folding, the PTQ way
    folded.calibrate(data, progress=False)
    qa, qb = sim.quantizers(), folded.quantizers()
    assert torch.allclose(qa["0.weight"].scale, qb["0.weight"].scale, rtol=1e-5)  # the grid of the folded weight
    with torch.no_grad():
        a, b = sim(data[0]), folded(data[0])
    step = float(qa["8"].scale)
    assert (a - b).abs().max() <= 2 * step and (a.argmax(1) == b.argmax(1)).all()
    # training mode with quantizers off is the float model in training mode: batch statistics, running ones updated
    ref = copy.deepcopy(model).train()
    sim.train()
    with torch.no_grad(), sim.quantization_disabled():
        got = sim(data[1])
    with torch.no_grad():
        want = ref(data[1])
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(sim.model.get_submodule("1").running_mean, ref[1].running_mean, atol=1e-6)
    teacher = sim.float_model()  # the distillation teacher keeps its batch norms
    assert isinstance(teacher[1], nn.BatchNorm2d) and type(teacher[1]) is nn.BatchNorm2d


def test_statistics_freeze_then_fold_exports_bit_exact(tmp_path):
    import onnxruntime as ort
    model, data = _net(), [torch.randn(8, 3, 10, 10) for _ in range(4)]
    sim, _ = _sim(model, data)
    bn = sim.model.get_submodule("4")
    prepare_qat(sim)  # learned grids on top: the weight quantizer learns the folded weight's scale
    finetune(sim, data, steps=2, lr=1e-3, progress=False)
    moved = bn.running_mean.clone()
    assert int(sim.model.get_submodule("3").bn_batches) == 2
    finetune(sim, data, steps=3, lr=1e-3, progress=False)
    assert int(sim.model.get_submodule("3").bn_batches) == 3  # frozen after 3 training batches
    frozen = bn.running_mean.clone()
    finetune(sim, data, steps=2, lr=1e-3, progress=False)
    assert not torch.equal(moved, frozen) and torch.equal(bn.running_mean, frozen)
    with pytest.raises(eq.errors.ExportError, match="fold_simulated_bn"):
        eq.export_onnx(sim, tmp_path / "no.onnx")
    sim.eval()
    x = torch.randn(16, 3, 10, 10)
    with torch.no_grad():
        before = sim(x)
    assert fold_simulated_bn(sim) == ["0", "3"]
    with torch.no_grad():
        assert torch.equal(sim(x), before)  # folding for good changes nothing
    assert isinstance(sim.model.get_submodule("4"), nn.Identity)
    info = eq.export_onnx(sim, tmp_path / "bn.onnx")
    s = ort.InferenceSession(info["onnx"], providers=["CPUExecutionProvider"])
    got = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad(), sim.integer_exact("float32"):
        exact = sim(x).numpy()
    assert np.array_equal(got, exact)
    assert isinstance(sim.float_model()[4], nn.Identity)  # the float model that goes with the encodings is folded too


def test_a_sim_that_folded_its_batch_norms_is_refused():
    model, data = _net(), [torch.randn(4, 3, 10, 10)]
    with pytest.raises(ValueError, match="fold_bn=False"):
        simulate_bn_folding(eq.QuantSim(model, data[0][:1], "w8a8"))
