"""Real MobileNetV2 (ImageNet weights) on real photo crops: fidelity floors per preset."""
import pytest
import torch

from edgequant import QuantSim
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
