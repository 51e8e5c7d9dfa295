"""Attention decomposed into parts that get quantizers: nn.MultiheadAttention (torchvision's ViT) and
F.scaled_dot_product_attention (timm, Hugging Face)."""
import os
import warnings

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.models import VisionTransformer

from edgequant import QuantSim, export_onnx
from edgequant.graph.attention import decompose_sdpa
from edgequant.nn.attention import DecomposedMultiheadAttention
from edgequant.sim.prepare import propagate_shapes


@pytest.mark.parametrize("kw,call", [
    (dict(batch_first=True), dict()),
    (dict(batch_first=False), dict(need_weights=False)),
    (dict(batch_first=True, kdim=6, vdim=5), dict(average_attn_weights=False)),
    (dict(batch_first=True, bias=False), dict(attn_mask="bool")),
    (dict(batch_first=True), dict(attn_mask="float", key_padding_mask="bool", need_weights=False)),
    (dict(batch_first=False), dict(attn_mask="heads")),
])
def test_decomposed_mha_computes_what_torch_does(kw, call):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, **kw).eval()
    n, l, s = 3, 4, 6
    q = torch.randn((n, l, 8) if mha.batch_first else (l, n, 8))
    k = torch.randn((n, s, kw.get("kdim", 8)) if mha.batch_first else (s, n, 8))
    v = torch.randn((n, s, kw.get("vdim", 8)) if mha.batch_first else (s, n, 8))
    call = dict(call)
    masks = {"bool": torch.rand(l, s) > 0.7, "float": torch.randn(l, s), "heads": torch.rand(n * 2, l, s) > 0.7}
    if "attn_mask" in call:
        call["attn_mask"] = masks[call["attn_mask"]]
    if "key_padding_mask" in call:
        call["key_padding_mask"] = torch.tensor([[False] * 5 + [True]] * n)
    ref = mha(q, k, v, **call)
    got = DecomposedMultiheadAttention.from_float(mha).eval()(q, k, v, **call)
    for r, g in zip(ref, got):
        assert (r is None) == (g is None)
        if r is not None:
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


class _Sdpa(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.kw)


@pytest.mark.parametrize("kw,mask", [({}, None), ({"is_causal": True}, None), ({"scale": 0.3}, "bool"), ({}, "float")])
def test_sdpa_split_into_two_products_and_a_softmax(kw, mask):
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    m = {"bool": torch.rand(5, 7) > 0.3, "float": torch.randn(5, 7), None: None}[mask]
    model = _Sdpa(**kw)
    gm = fx.symbolic_trace(model)
    propagate_shapes(gm, (q, k, v, m), {})
    assert decompose_sdpa(gm) == 1
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert F.scaled_dot_product_attention not in targets and targets.count(torch.matmul) == 2
    torch.testing.assert_close(gm(q, k, v, m), model(q, k, v, m), atol=1e-5, rtol=1e-4)


def _vit():
    torch.manual_seed(0)
    m = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                          num_classes=10).eval()
    nn.init.normal_(m.heads.head.weight, std=0.2)  # torchvision initializes the head to zero
    return m


def test_torchvision_vit_attention_quantized_and_bit_exact_in_ort(tmp_path):
    model = _vit()
    x, calib = torch.randn(2, 3, 32, 32), [torch.randn(4, 3, 32, 32) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = QuantSim(model, x, "w8a8")
    assert isinstance(model.encoder.layers[0].self_attention, nn.MultiheadAttention)  # the user's model untouched
    assert sim.unsupported == []
    names = set(sim.quantizers())
    scope = "encoder.layers.encoder_layer_0.self_attention"
    for t in ("q_proj.weight", "k_proj", "v_proj", "matmul", "attention_softmax", "matmul_1", "out_proj.weight"):
        assert f"{scope}.{t}" in names
    assert sim.quantizers()[f"{scope}.attention_softmax"].spec.signed is False  # probabilities: unsigned grid
    sim.calibrate(calib, progress=False)
    with sim.quantization_disabled():
        torch.testing.assert_close(sim(x), model(x), atol=1e-5, rtol=1e-4)
    path = export_onnx(sim, tmp_path / "vit.onnx", tables=True, float64=True)["onnx"]  # GELU by table: CPU-independent
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    out = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    kernels = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert kernels.count("QLinearMatMul") >= 4  # both attention products of both layers on integers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with sim.integer_exact(tables=True, float64=True):
            exact = sim(x)
    assert torch.equal(torch.from_numpy(out), exact)
    back = sim.float_model()  # the rewritten layers travel with the weights
    assert isinstance(back.encoder.layers[0].self_attention, DecomposedMultiheadAttention)
    with sim.quantization_disabled():
        torch.testing.assert_close(back(x), sim(x), atol=1e-5, rtol=1e-4)
    assert os.path.exists(path)


class _SeqFirst(nn.Module):
    """``mha(x, x, x)[0]``: sequence first, the attention weights computed (need_weights=True) and discarded."""

    def __init__(self):
        super().__init__()
        self.attn, self.fc = nn.MultiheadAttention(16, 4), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.attn(x, x, x)[0])


def test_discarded_weights_and_one_input_grid():
    x = torch.randn(5, 2, 16)
    sim = QuantSim(_SeqFirst().eval(), x, "w8a8")
    acts = [k for k, q in sim.quantizers().items() if q.spec is not None and not k.endswith(".weight")]
    assert not any(k.endswith("mean") for k in acts)  # the discarded weights are not computed
    assert sum(k.startswith("attn.transpose") for k in acts) == 1  # query, key, value: one tensor, one grid


class _TimmAttention(nn.Module):
    """timm's ``Attention``: one qkv projection, ``unbind`` into q, k, v, fused ``F.scaled_dot_product_attention``."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


def test_timm_style_attention_runs_on_integers_in_ort(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    sim = QuantSim(_TimmAttention().eval(), x, "w8a8")
    assert sim.unsupported == []
    sim.calibrate([x, torch.randn(2, 6, 16)], progress=False)
    path = export_onnx(sim, tmp_path / "attn.onnx", float64=True)["onnx"]
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    out = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node].count("QLinearMatMul") == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with sim.integer_exact(float64=True) as mode:
            exact = sim(x)
    assert not [t for t in mode.float_computed if "matmul" in t]  # both products exact on integers (q, k, v selected)
    assert torch.equal(torch.from_numpy(out), exact)


class _Eager(nn.Module):
    """Attention written out: Hugging Face's eager BERT (``q @ k^T * scale + mask``) or timm's unfused path
    (``(q * scale) @ k^T``)."""

    def __init__(self, scale_first: bool):
        super().__init__()
        self.scale_first, self.q, self.k, self.v = scale_first, nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        q, k = self.q(x), self.k(x)
        if self.scale_first:
            s = torch.softmax((q * 0.35) @ k.transpose(-2, -1), dim=-1)
        else:
            s = (q @ k.transpose(-2, -1) / 2.8).softmax(-1)
        return s @ self.v(x)


@pytest.mark.parametrize("scale_first", [False, True])
def test_written_out_attention_rounds_its_scores_once(scale_first):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    model = _Eager(scale_first).eval()
    sim = QuantSim(model, x, "w8a8")
    acts = [k for k in sim.quantizers() if not k.endswith((".weight", ".bias"))]
    assert not {"mul", "truediv"} & set(acts)  # no second grid for the scaled scores
    assert {"matmul", "attention_softmax", "matmul_1"} <= set(acts)
    with sim.quantization_disabled():
        torch.testing.assert_close(sim(x), model(x), atol=1e-5, rtol=1e-4)


class _Windows(nn.Module):
    """Window partition as Swin / DaViT write it: pad to a multiple of the window with amounts computed from the sizes
    (nothing to pad here), then a linear layer on the windows."""

    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 6)

    def forward(self, x):
        b, h, w, c = x.shape
        x = F.pad(self.norm(x), (0, 0, 0, (4 - w % 4) % 4, 0, (4 - h % 4) % 4))
        x = x.view(b, h // 4, 4, w // 4, 4, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 16, c)
        return self.fc(x)


def test_a_pad_of_nothing_sized_by_shape_arithmetic_keeps_the_integers(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 8)
    sim = QuantSim(_Windows().eval(), x, "w8a8")
    sim.calibrate([x, torch.randn(2, 8, 8, 8)], progress=False)
    path = export_onnx(sim, tmp_path / "win.onnx", float64=True)["onnx"]
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    out = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    kernels = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert "QGemm" in kernels and "MatMul" not in kernels  # the linear runs on the padded-by-nothing integers
    with warnings.catch_warnings(), torch.no_grad(), sim.integer_exact(float64=True):
        warnings.simplefilter("ignore")
        assert torch.equal(torch.from_numpy(out), sim(x))
