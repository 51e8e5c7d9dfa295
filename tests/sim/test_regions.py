"""RegionSim: models whose pre/post-processing does not trace (detectors) quantized region by region, each region a
graph-mode QuantSim, exported one ONNX file per region, and the deployed model bit-identical to the integer-exact sim."""
import copy

import pytest
import torch
from torch import nn

import edgequant
from edgequant import QuantSim, RegionSim
from edgequant.export.regions import deployed


class Head(nn.Module):
    """Takes a list of feature maps (torch.fx cannot iterate it; torch.export can)."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, feats):
        return torch.cat([self.cls(f).flatten(1) for f in feats], dim=1)


class Detector(nn.Module):
    """A backbone and a head around data-dependent glue (a Python branch on a value: no tracer keeps it)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = Head()

    def forward(self, images: list):
        x = torch.stack([im - im.mean() for im in images])  # per-image preprocessing
        f1 = self.backbone(x)
        f2 = self.down(f1)
        scores = self.head([f1, f2]).sigmoid()
        if float(scores.max()) > 0.9:  # data-dependent control flow
            scores = scores.clamp(max=0.9)
        keep = scores > 0.5
        return {"scores": scores[keep], "count": keep.sum(dim=1)}


def _images(seed, n=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 16, 16, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def det():
    torch.manual_seed(0)
    m = Detector()
    with torch.no_grad():
        m.backbone[1].running_mean.uniform_(-0.2, 0.2)
        m.backbone[1].running_var.uniform_(0.5, 2.0)
    return m.eval()


def test_regions_are_the_largest_submodules_that_capture(det):
    before = copy.deepcopy(det.state_dict())
    with pytest.warns(Warning, match="RegionSim"):  # the whole model falls back to leaf modules and says what to use
        assert QuantSim(det, (_images(0),), "w8a8").capture_mode == "leaf"
    sim = RegionSim(det, (_images(0),))
    assert sorted(sim.regions) == ["backbone", "down", "head"]
    assert all(r.capture_mode == "graph" for r in sim.regions.values())
    assert sim.regions["backbone"].bn_folding.folded  # each region folds its batch norms
    with torch.no_grad(), sim.quantization_disabled():
        out, ref = sim(_images(1)), det(_images(1))
    assert torch.allclose(out["scores"], ref["scores"], atol=1e-5) and torch.equal(out["count"], ref["count"])
    assert all(torch.equal(v, before[k]) for k, v in det.state_dict().items())  # the user's model is untouched
    assert "3 region(s)" in sim.summary()


def test_deployed_regions_in_onnx_runtime_are_bit_identical_to_the_integer_exact_sim(det, tmp_path):
    sim = RegionSim(det, (_images(0),))
    sim.calibrate([(_images(s),) for s in range(4)], progress=False)
    paths = edgequant.export_onnx(sim, tmp_path / "regions")
    assert sorted(paths) == ["backbone", "down", "head"] and all((tmp_path / "regions" / f"{n}.onnx").exists() for n in paths)
    ort_model = deployed(sim, paths)
    for seed in (5, 6):
        with torch.no_grad():
            got = ort_model(_images(seed, 3))
            with sim.integer_exact():
                want = sim(_images(seed, 3))
        assert torch.equal(got["count"], want["count"]) and torch.equal(got["scores"], want["scores"])
    # with symbolic height and width, one file per region serves images of every size
    ort_model = deployed(sim, edgequant.export_onnx(sim, tmp_path / "any_size", dynamic_size=True))
    g = torch.Generator().manual_seed(8)
    images = [torch.rand(3, 24, 40, generator=g) for _ in range(2)]
    with torch.no_grad():
        got = ort_model(images)
        with sim.integer_exact():
            want = sim(images)
    assert got["count"].shape == (2,) and torch.equal(got["count"], want["count"])
    assert torch.equal(got["scores"], want["scores"])
    with pytest.raises(ValueError, match="folder"):
        edgequant.export_onnx(sim, tmp_path / "one.onnx")


def test_named_regions_are_checked(det):
    sim = RegionSim(det, (_images(0),), regions=["backbone"])
    assert list(sim.regions) == ["backbone"]
    with pytest.raises(ValueError, match="did not run"):
        RegionSim(det, (_images(0),), regions=["nope"])


def test_a_real_detector_runs_in_onnx_runtime_as_the_integer_exact_sim(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = torchvision.models.get_model("ssdlite320_mobilenet_v3_large", weights=None, weights_backbone=None).eval()
    g = torch.Generator().manual_seed(0)
    batches = [([torch.rand(3, 320, 320, generator=g)],) for _ in range(2)]
    sim = RegionSim(m, batches[0])
    assert sorted(sim.regions) == ["backbone", "head"]
    sim.calibrate(batches, progress=False)
    ort_model = deployed(sim, edgequant.export_onnx(sim, tmp_path))
    x = ([torch.rand(3, 320, 320, generator=g)],)
    with torch.no_grad():
        got = ort_model(*x)[0]
        with sim.integer_exact():
            want = sim(*x)[0]
    assert len(got["boxes"]) > 0 and all(torch.equal(got[k], want[k]) for k in ("boxes", "scores", "labels"))


def test_quantize_runs_the_pipeline_region_by_region(det, tmp_path):
    before = copy.deepcopy(det.state_dict())
    data = [(_images(s, 4), None) for s in range(6)]  # each batch: (images, targets), as every pass reads batches
    result = edgequant.quantize(det, data, "w8a8", ptq="auto", progress=False)
    sim = result.sim
    assert isinstance(sim, RegionSim) and sorted(sim.regions) == ["backbone", "down", "head"]
    assert sorted(result.encodings) == ["backbone", "down", "head"]
    names = [s.name for s in result.report.stages]
    assert "backbone: bn_fold" in names and "head: calibrate (no PTQ)" in names  # each region ran its own stages
    assert all(s.sqnr_db is not None and s.sqnr_db > 15 for s in result.report.stages if s.kept)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())  # the float model, folded
    with torch.no_grad(), sim.quantization_disabled():  # which computes what the user's model computes
        out, ref = sim(_images(9)), det(_images(9))
    assert torch.allclose(out["scores"], ref["scores"], atol=1e-4)
    ort_model = deployed(sim, edgequant.export_onnx(sim, tmp_path / "regions"))
    with torch.no_grad():
        got = ort_model(_images(7, 3))
        with sim.integer_exact():
            want = sim(_images(7, 3))
    assert torch.equal(got["scores"], want["scores"])
    assert all(torch.equal(v, before[k]) for k, v in det.state_dict().items())  # the user's model is untouched
    with pytest.raises(ValueError, match="eval_fn"):
        edgequant.quantize(det, data, "w8a8", eval_fn=lambda m: 0.0, progress=False)
    with pytest.raises(ValueError, match="not submodules"):
        edgequant.quantize(det, data, "w8a8", regions=["nope"], progress=False)
