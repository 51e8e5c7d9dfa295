"""Quantization-aware training: LSQ gradients, learned grids, prepare_qat, finetune, export after QAT."""
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

import edgequant
from edgequant import NotCalibratedError, QuantConfig, QuantSim, QuantSpec, export_onnx, quantize
from edgequant.core.quant import fake_quantize, lsq_fake_quantize
from edgequant.nn.quantizer import LearnedQuantizer, make_quantizer
from edgequant.qat import finetune, prepare_qat
from edgequant.errors import DataError


def test_lsq_gradients_follow_the_published_rule():
    """Inside the grid: dx = 1, ds = g (round(v) - v), doffset = 0; clipped: dx = 0, ds = g (bound - z), doffset = -s."""
    x = torch.tensor([0.26, 9.0, -3.0, 1.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    off = torch.tensor(3.2, requires_grad=True)  # zero point round(3.2) = 3
    y = lsq_fake_quantize(x, s, off, 0, 15, grad_scale=0.25)
    assert torch.equal(y.detach(), fake_quantize(x.detach(), s.detach(), torch.tensor(3), 0, 15))
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    (y * w).sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 0.0, 4.0]
    v = x.detach() / 0.5  # 0.52, 18, -6, 2: inside, above (15 - 3), below (0 - 3), inside
    ds = torch.stack([v[0].round() - v[0], torch.tensor(12.0), torch.tensor(-3.0), v[3].round() - v[3]])
    assert torch.allclose(s.grad, 0.25 * (w * ds).sum())
    assert torch.allclose(off.grad, torch.tensor(-0.5 * 2 - 0.5 * 3))


def test_learned_quantizer_keeps_integer_zero_points_and_positive_scales():
    spec = QuantSpec(bits=8, symmetric=False, signed=False, learn="scale_offset")
    q = make_quantizer(spec, torch.Size([16]), "x")
    assert isinstance(q, LearnedQuantizer) and {n for n, _ in q.named_parameters()} == {"scale", "offset"}
    with q.calibrating():
        q(torch.linspace(-1, 3, 16))
    with torch.no_grad():
        q.offset.fill_(300.7)  # off the grid
        q.scale.fill_(-1.0)
    enc = q.encoding()
    assert enc.zero_point.dtype == torch.int32 and int(enc.zero_point) == 255 and float(enc.scale) > 0
    sym = make_quantizer(QuantSpec(bits=4, symmetric=True, signed=True, learn="scale_offset"), torch.Size([4]), "w")
    assert {n for n, _ in sym.named_parameters()} == {"scale"}  # a symmetric grid's zero point stays 0
    with pytest.raises(ValueError, match="learn must be one of"):
        QuantSpec(learn="everything")
    assert QuantSpec.from_dict(spec.to_dict()) == spec and "learn" not in QuantSpec().to_dict()


def _w4a4():
    base = QuantConfig.preset("w4a8")
    return replace(base, activation=replace(base.activation, bits=4))


def _acc(m, x, y):
    with torch.no_grad():
        return float((m(x).argmax(1) == y).float().mean())


def test_prepare_keeps_every_output_and_adaround_weights(tiny_net, digits):
    xtr, _, xte, _ = digits
    res = quantize(tiny_net, [xtr[i:i + 64] for i in range(0, 256, 64)], "w4a8", ptq=["bn_fold", "adaround"],
                   adaround_iterations=20, progress=False)
    sim = res.sim
    with torch.no_grad():
        before = sim(xte)
    weights = {n: p.detach().clone() for n, p in sim.named_parameters()}
    learning = prepare_qat(sim)
    assert "stem.0.weight" in learning and all(isinstance(q, LearnedQuantizer) for q in sim.quantizers().values())
    with torch.no_grad():
        assert torch.equal(sim(xte), before)  # the AdaRound starting point, to the last bit
    assert all(torch.equal(p, weights[n]) for n, p in sim.named_parameters() if n in weights)
    assert sim.quantizers()["stem.0.weight"].is_frozen  # AdaRound's weight encodings stay put on recalibration
    assert all(sim.plan[n].spec.learn == "scale_offset" for n in learning)
    fresh = QuantSim(tiny_net, xtr[:1], "w8a8")
    with pytest.raises(NotCalibratedError, match="calibrate"):
        prepare_qat(fresh)


def test_qat_with_labels_and_with_distillation_beats_ptq_at_w4a4(tiny_net, digits):
    xtr, ytr, xte, yte = digits
    cal = [xtr[i:i + 64] for i in range(0, 512, 64)]
    results = {}
    for mode in ("labels", "distill"):
        torch.manual_seed(0)
        sim = QuantSim(tiny_net, xtr[:1], _w4a4())
        sim.calibrate(cal, progress=False)
        ptq_acc = _acc(sim, xte, yte)
        with torch.no_grad():
            ptq_sq = edgequant.metrics.sqnr_db(tiny_net(xte), sim(xte))
        prepare_qat(sim)
        if mode == "labels":
            data = [(xtr[i:i + 64], ytr[i:i + 64]) for i in range(0, 1400, 64)]
            rep = finetune(sim, data, epochs=3, lr=3e-3, loss=lambda out, b: F.cross_entropy(out, b[1]), progress=False)
            assert not rep.sqnr_db  # no teacher for the user's own loss
        else:
            rep = finetune(sim, [xtr[i:i + 64] for i in range(0, 1400, 64)], epochs=3, lr=3e-3, progress=False)
            with torch.no_grad():
                assert edgequant.metrics.sqnr_db(tiny_net(xte), sim(xte)) > ptq_sq + 1.0  # held-out digits
        assert not sim.training and rep.steps == 66 and len(rep.loss) == 66
        assert np.mean(rep.loss[-10:]) < np.mean(rep.loss[:10])
        results[mode] = (ptq_acc, _acc(sim, xte, yte))
    assert all(after > before for before, after in results.values()), results


def test_after_qat_the_sim_exports_round_trips_and_stays_bit_exact(tiny_net, digits, tmp_path):
    xtr, _, xte, _ = digits
    sim = QuantSim(tiny_net, xtr[:1], "w8a8")
    sim.calibrate([xtr[i:i + 64] for i in range(0, 256, 64)], progress=False)
    prepare_qat(sim)
    finetune(sim, [xtr[i:i + 64] for i in range(0, 640, 64)], steps=10, lr=1e-3, progress=False)
    learned = [q for q in sim.quantizers().values() if isinstance(q, LearnedQuantizer)]
    assert learned and all(q.encoding().zero_point.dtype == torch.int32 and bool((q.scale > 0).all()) for q in learned)
    info = export_onnx(sim, tmp_path / "m.onnx")
    s = ort.InferenceSession(info["onnx"], providers=["CPUExecutionProvider"])
    o = s.run(None, {s.get_inputs()[0].name: xte.numpy()})[0]
    with torch.no_grad(), sim.integer_exact():
        assert np.array_equal(o, sim(xte).numpy())
    sim.save_encodings(tmp_path / "e.json")  # the encodings of the trained grids reproduce the sim
    fresh = QuantSim(sim.float_model(), xtr[:1], "w8a8")
    fresh.load_encodings(tmp_path / "e.json")
    with torch.no_grad():
        assert torch.equal(fresh(xte), sim(xte))
    sim.save(tmp_path / "saved")  # and a saved sim comes back with its learned quantizers
    loaded = edgequant.load(tmp_path / "saved")
    assert isinstance(loaded.quantizers()["stem.2"], LearnedQuantizer)
    with torch.no_grad():
        assert torch.equal(loaded(xte), sim(xte))


def test_checkpoints_resume_where_they_stopped(tiny_net, digits, tmp_path):
    xtr, _, xte, _ = digits
    data = [xtr[i:i + 64] for i in range(0, 320, 64)]

    def fresh():
        torch.manual_seed(0)
        sim = QuantSim(tiny_net, xtr[:1], "w4a8")
        sim.calibrate(data, progress=False)
        prepare_qat(sim)
        return sim

    straight = fresh()
    finetune(straight, data, steps=8, lr=1e-3, progress=False)
    first = fresh()

    def stop_at_step_5(sim):
        if len(first_evals) == 4:
            raise KeyboardInterrupt
        first_evals.append(1)
        return 0.0

    first_evals = []
    with pytest.raises(KeyboardInterrupt):  # interrupted in step 5: the checkpoint of step 4 stays
        finetune(first, data, steps=8, lr=1e-3, progress=False, checkpoint=tmp_path / "c.pt", checkpoint_every=2,
                 eval_fn=stop_at_step_5, eval_every=1)
    resumed = fresh()
    rep = finetune(resumed, data, steps=8, lr=1e-3, progress=False, checkpoint=tmp_path / "c.pt", report_dir=tmp_path / "r")
    assert rep.resumed_from == 4 and rep.steps == 8 and len(rep.loss) == 8
    with torch.no_grad():
        assert torch.allclose(resumed(xte), straight(xte), atol=1e-5)
    assert (tmp_path / "r" / "report.json").exists() and (tmp_path / "r" / "qat.png").exists()


def test_finetune_bad_input(tiny_net, digits):
    xtr = digits[0]
    sim = QuantSim(tiny_net, xtr[:1], "w8a8")
    sim.calibrate([xtr[:64]], progress=False)
    with pytest.raises(ValueError, match="scalar"):
        finetune(sim, [xtr[:64]], steps=1, loss=lambda out, b: out, progress=False)
    with pytest.raises(ValueError, match="without a teacher"):
        finetune(sim, [xtr[:64]], steps=1, teacher=None, progress=False)
    with pytest.raises(ValueError, match="steps or epochs"):
        finetune(sim, [xtr[:64]], steps=1, epochs=1, progress=False)
    bad = xtr[:64].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        finetune(sim, [bad], steps=1, progress=False)


def test_dropout_is_off_while_fine_tuning_unless_asked():
    """Dropout in the student and not in the teacher kept a MobileNetV2 sim at 8-9 dB on its own batches."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(64, 10)).eval()
    data = [torch.randn(32, 16) for _ in range(3)]
    sqnr = {}
    for dropout in (False, True):
        sim = QuantSim(net, data[0][:1], "w8a8")
        sim.calibrate(data, progress=False)
        rep = finetune(sim, data, steps=3, lr=1e-9, teacher=net, dropout=dropout, progress=False)
        sqnr[dropout] = min(rep.sqnr_db)
        assert not sim.training
    assert sqnr[False] > 25 and sqnr[True] < 10, sqnr
    assert all(p.requires_grad for p in net.parameters()) and not net.training  # the teacher as it came
    net.train()
    finetune(sim, data, steps=1, lr=1e-9, teacher=net, progress=False)
    assert net.training and all(m.training for m in net.modules())
