"""export_onnx(dynamic_size=...): one file for every image size, checked by building the graph at two sizes."""
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgequant import QuantSim, export_onnx
from edgequant.errors import ExportError


class Backbone(nn.Module):
    """A detector's backbone: convolutions, a residual add, an upsampling by a fixed factor; outputs two feature maps
    and a pooled vector (``x.view(x.size(0), -1)`` after a global pool)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
        self.lateral = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        c1 = self.stem(x)
        c2 = self.down(c1)
        p1 = self.lateral(c1) + F.interpolate(c2, scale_factor=2.0, mode="nearest")
        pooled = F.adaptive_avg_pool2d(c2, 1)
        return p1, c2, pooled.view(pooled.size(0), -1)


class Segmenter(nn.Module):
    """Sizes read from tensors' shapes, as torchvision's FPN and segmentation heads do: a top-down nearest upsampling to
    the lateral's size and a final bilinear upsampling to the input's size."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
        self.lateral = nn.Conv2d(8, 8, 1)
        self.cls = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        size = x.shape[-2:]
        c1 = self.c1(x)
        p = self.lateral(c1) + F.interpolate(self.c2(c1), size=c1.shape[-2:], mode="nearest")
        return F.interpolate(self.cls(p), size=size, mode="bilinear", align_corners=False)


class ChannelsLast(nn.Module):
    """ConvNeXt's block: a depthwise conv, then LayerNorm and linear layers on channels-last pixels (integers reshaped
    to rows for the integer GEMM and back to the pixel grid)."""

    def __init__(self):
        super().__init__()
        self.dw, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.LayerNorm(8)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        return self.fc2(torch.relu(self.fc1(y))).permute(0, 3, 1, 2)


class Shuffle(nn.Module):
    """ShuffleNet's channel shuffle: a reshape whose sizes come from ``x.size()``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.a(x))
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        return self.b(x)


class FixedGrid(nn.Module):
    """Pools to a fixed 2x2 grid: the kernel of the exported pool follows the input size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv(x), 2), 1))


def _sim(model, x):
    sim = QuantSim(model.eval(), x[:1], "w8a8")
    sim.calibrate([x], progress=False)
    return sim


def test_one_file_runs_every_size_and_matches_the_exact_sim(tmp_path):
    torch.manual_seed(0)
    sim = _sim(Backbone(), torch.randn(4, 3, 32, 32))
    export_onnx(sim, tmp_path / "m.onnx", dynamic_size=True)
    m = onnx.load(tmp_path / "m.onnx")
    dims = [[d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in m.graph.input]
    assert dims == [["N", 3, "x_dim2", "x_dim3"]]
    assert [d.dim_value for d in m.graph.output[2].type.tensor_type.shape.dim][1:] == [8]  # the pooled vector: fixed
    s = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for h, w in [(32, 32), (48, 80), (64, 40)]:  # other sizes and aspect ratios than the example's
        x = torch.randn(2, 3, h, w)
        got = s.run(None, {"x": x.numpy()})
        with torch.no_grad(), sim.integer_exact():
            ref = sim(x)
        assert [tuple(g.shape) for g in got] == [tuple(r.shape) for r in ref]
        for g, r in zip(got, ref):
            assert np.array_equal(g, r.numpy())


def _exact_at_sizes(model_class, path, sizes, batch, **options):
    """Export a sim of ``model_class()`` with symbolic sizes; ONNX Runtime must match ``integer_exact`` at each size."""
    torch.manual_seed(0)
    sim = _sim(model_class(), torch.randn(4, 3, 16, 16))
    export_onnx(sim, path, dynamic_size=True, **options)
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for h, w in sizes:
        x = torch.randn(batch, 3, h, w)
        with torch.no_grad(), sim.integer_exact(**options):
            ref = sim(x).numpy()
        assert np.array_equal(s.run(None, {"x": x.numpy()})[0], ref)


def test_linear_layers_on_pixels_keep_the_grid_symbolic(tmp_path):
    _exact_at_sizes(ChannelsLast, tmp_path / "m.onnx", [(16, 16), (24, 40)], 2, float64=True)


def test_reshapes_sized_by_shapes_compute_their_targets_at_run_time(tmp_path):
    _exact_at_sizes(Shuffle, tmp_path / "m.onnx", [(16, 16), (20, 36)], 3)


def test_sizes_read_from_shapes_are_read_at_run_time(tmp_path):
    torch.manual_seed(0)
    sim = _sim(Segmenter(), torch.randn(4, 3, 32, 32))
    export_onnx(sim, tmp_path / "m.onnx", dynamic_size=True)
    s = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for h, w in [(32, 32), (40, 72), (64, 24)]:
        x = torch.randn(2, 3, h, w)
        got = s.run(None, {"x": x.numpy()})[0]
        with torch.no_grad():
            ref = sim(x).numpy()
        assert got.shape == (2, 4, h, w)
        assert np.abs(got - ref).max() < 1e-4  # the final bilinear upsampling runs in float after the last quantizer


def test_a_graph_sized_by_its_input_is_refused_or_kept_static(tmp_path):
    torch.manual_seed(0)
    sim = _sim(FixedGrid(), torch.randn(4, 3, 16, 16))
    with pytest.raises(ExportError, match="depends on the input's height and width"):
        export_onnx(sim, tmp_path / "m.onnx", dynamic_size=True)
    assert not (tmp_path / "m.onnx").exists()
    with pytest.warns(UserWarning, match="keeps the example's height and width"):
        export_onnx(sim, tmp_path / "m.onnx", dynamic_size=None)
    m = onnx.load(tmp_path / "m.onnx")
    assert [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim][1:] == [3, 16, 16]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_onnx(sim, tmp_path / "m.onnx")  # the default: the example's size, no check, no warning


def test_a_model_of_one_input_size_is_refused(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    sim = _sim(model, torch.randn(4, 3, 8, 8))
    with pytest.raises(ExportError, match="takes one input size"):
        export_onnx(sim, tmp_path / "m.onnx", dynamic_size=True)
