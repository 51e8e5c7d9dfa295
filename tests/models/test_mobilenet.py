"""Real MobileNetV2 (ImageNet weights) on real photo crops: fidelity floors per preset."""
import pytest
import torch

from edgequant import QuantSim, export_onnx
from edgequant.analysis import fidelity
from edgequant.data import CALIBRATION_PHOTOS, EVALUATION_PHOTOS, calibration_crops, evaluation_crops
from edgequant.models import mobilenet_v2_imagenet

pytestmark = pytest.mark.slow


def test_photo_splits_are_disjoint_and_crops_deterministic():
    assert not set(CALIBRATION_PHOTOS) & set(EVALUATION_PHOTOS)
    a, b = evaluation_crops(4), evaluation_crops(4)
    assert torch.equal(a, b) and a.shape == (4, 3, 224, 224)
    assert not torch.equal(calibration_crops(4), a)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = mobilenet_v2_imagenet()
    calib, ev = calibration_crops(32), evaluation_crops(64)
    with torch.no_grad():
        ref = model(ev)
    return model, calib, ev, ref


@pytest.mark.parametrize("config,min_top1,min_sqnr", [("w8a8", 0.65, 8.0), ("w8a8_per_tensor", 0.55, 6.0)])
def test_mobilenet_fidelity_floor(setup, config, min_top1, min_sqnr):
    model, calib, ev, ref = setup
    sim = QuantSim(model, calib[:1], config=config)
    assert sim.capture_mode == "graph" and not sim.unsupported
    sim.calibrate(calib.split(16), progress=False)
    with torch.no_grad():
        f = fidelity(ref, sim(ev))
    assert f.top1 >= min_top1 and f.sqnr_db >= min_sqnr, f


def test_mobilenet_onnx_and_integer_engine_match_the_sim(setup, tmp_path):
    """The QDQ export of the real model runs in ONNX Runtime with every conv and add fused into its
    integer kernels, and matches the sim's integer-exact mode on every logit; the integer engine
    matches it in both requantization modes. The plain float sim is as faithful to FP32, but a
    one-step rounding difference early in the network grows layer by layer, so it is compared on
    quality only."""
    from collections import Counter

    import numpy as np
    import onnx
    import onnxruntime as ort

    from edgequant.export.integer import IntegerEngine
    from edgequant.ptq import fold_batch_norms

    model, calib, ev, ref = setup
    folded, _ = fold_batch_norms(model)
    sim = QuantSim(folded, calib[:1], config="w8a8")
    sim.calibrate(calib.split(16), progress=False)
    info = export_onnx(sim, tmp_path / "mnv2.onnx")
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    sess = ort.InferenceSession(info["onnx"], so, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ops["QLinearConv"] == 52 and ops["QLinearAdd"] == 10 and ops["Conv"] == 0, ops
    ev = ev[:8]  # the integer engine runs integer convolutions without a fast kernel: 8 crops keep it short
    out = torch.from_numpy(np.concatenate([sess.run(None, {"x": b.numpy()})[0] for b in ev.split(16)]))
    step = float(sim.quantizers()["classifier.1"].scale)
    for mode in ("float32", "fixed_point"):
        with sim.integer_exact(mode):
            exact = sim(ev)
        engine = IntegerEngine(sim, requant=mode)(ev)
        steps = (engine - exact).abs() / step
        assert (engine.argmax(1) == exact.argmax(1)).all() and (steps <= 1.001).double().mean() >= 0.999, mode
        if mode == "float32":
            steps = (out - exact).abs() / step
            assert (out.argmax(1) == exact.argmax(1)).all() and (steps <= 1.001).double().mean() >= 0.999
    with torch.no_grad():
        f_sim = fidelity(ref[:8], sim(ev))
    f = fidelity(ref[:8], out)
    assert f.sqnr_db > f_sim.sqnr_db - 1.0 and f.top1 >= f_sim.top1 - 0.125, (f, f_sim)  # one crop of 8
