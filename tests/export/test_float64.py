"""LayerNorm, GroupNorm, softmax, L2 norms and einsum in float64, rounded to float32 once: the export and the integer-exact sim compute
them alike, so a model whose float islands are these ops comes out of ONNX Runtime bit-identical with the sim."""
import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from edgequant import QuantSim, export_onnx
from edgequant.core.float64 import Float64Norms


class _Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln, self.gn = nn.LayerNorm(64), nn.GroupNorm(4, 8)
        self.table = nn.Parameter(torch.randn(7, 64))

    def forward(self, x, y):
        return (self.ln(x).softmax(-1), F.softmax(x, dim=1), torch.log_softmax(x, -1), self.gn(y),
                F.normalize(x, dim=-1), torch.linalg.vector_norm(x, 2, -1, True),  # cosine attention's L2 norm
                torch.einsum("bnc,kc->bnk", x, self.table))  # a float product (MViTv2's relative positions)


def test_float64_ops_traced_by_torch_onnx_compute_what_torch_computes_in_the_mode():
    torch.manual_seed(0)
    m = _Norms()
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(0.5, 2.0)
    x = torch.randint(-128, 128, (4, 50, 64)) * 0.0173  # dequantized values, as between two quantizers
    y = torch.randn(2, 8, 5, 5)
    with torch.no_grad(), Float64Norms():
        ref = m(x, y)
        buf = io.BytesIO()
        torch.onnx.export(m, (x, y), buf, dynamo=False, opset_version=17)
    with torch.no_grad():
        plain = m(x, y)
    graph = onnx.load_from_string(buf.getvalue()).graph
    assert "LayerNormalization" not in {n.op_type for n in graph.node}
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {i.name: v.numpy() for i, v in zip(graph.input, (x, y))})
    for r, p, o in zip(ref, plain, out):
        assert np.array_equal(r.numpy(), o)
        assert torch.allclose(r, p, atol=1e-5)  # the same function, up to float32 rounding


class _Encoder(nn.Module):
    """A pre-norm attention block and an MLP on tokens: LayerNorms and a softmax between quantizers."""

    def __init__(self, d=32):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        h = self.n1(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) * 0.125, dim=-1)
        x = x + self.o(a @ self.v(h))
        return x + self.fc2(torch.relu(self.fc1(self.n2(x))))


def test_an_encoder_exported_with_float64_norms_is_bit_identical_with_the_exact_sim(tmp_path):
    torch.manual_seed(0)
    cal = [torch.randn(4, 64, 32) * 3 for _ in range(2)]
    sim = QuantSim(_Encoder().eval(), cal[0], "w8a8")
    sim.calibrate(cal, progress=False)
    x = torch.randn(8, 64, 32) * 3
    path = export_onnx(sim, tmp_path / "m.onnx", float64=True)["onnx"]
    kinds = {n.op_type for n in onnx.load(path).graph.node}
    assert "LayerNormalization" not in kinds and "Softmax" in kinds
    out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with warnings.catch_warnings(), sim.integer_exact(float64=True) as mode:
        warnings.simplefilter("ignore")
        exact = sim(x).numpy()
    assert not {"LayerNorm", "attention_softmax"} & set(mode.float_computed.values()), mode.float_computed
    assert np.array_equal(out, exact)
    with sim.integer_exact() as plain:  # without float64 the same ops count as computed in float
        assert {"LayerNorm", "attention_softmax"} <= set(plain.float_computed.values())


class _Heads(nn.Module):
    """A segmentation head's bilinear upsampling to the input's size and CrossViT's bicubic resize of its input."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, stride=2), nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x):
        up = F.interpolate(self.a(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        small = F.interpolate(x, size=(11, 13), mode="bicubic", align_corners=False)
        return up + self.b(x), self.b(small)


def test_bilinear_and_bicubic_resizes_in_float64_are_bit_identical_in_ort(tmp_path):
    torch.manual_seed(0)
    cal = [torch.randn(8, 3, 17, 19) for _ in range(2)]
    sim = QuantSim(_Heads().eval(), cal[0], "w8a8")
    sim.calibrate(cal, progress=False)
    path = export_onnx(sim, tmp_path / "h.onnx", float64=True)["onnx"]
    assert "Resize" not in {n.op_type for n in onnx.load(path).graph.node}  # ORT has no double Resize: two MatMuls
    x = torch.randn(32, 3, 17, 19)
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    with torch.no_grad(), sim.integer_exact(float64=True) as mode:
        ref = sim(x)
    assert not [k for k in mode.float_computed.values() if "interpolate" in k], mode.float_computed
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r.numpy())
