"""Ops without a hand-written ONNX mapping go through torch.onnx in float between DQ and Q."""
import warnings
from collections import Counter

import numpy as np
import pytest
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from edgequant import QuantSim, export_onnx
from edgequant.metrics import sqnr_db


class Mixed(nn.Module):
    """LayerNorm over permuted channels, GELU, avg_pool2d, an adaptive pool to 2x2, the classifier-head
    idiom ``x.view(x.size(0), -1)`` and ``x.mean(dim)``: none has a hand-written mapping."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.ln = nn.LayerNorm(8)
        self.act = nn.GELU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.conv(x)
        x = self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = F.avg_pool2d(self.act(x), 2)
        x = self.pool(x).contiguous()
        y = self.fc(x.view(x.size(0), -1))
        return y - y.mean(dim=1, keepdim=True)


def _ort(path, feeds):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {i.name: v for i, v in zip(s.get_inputs(), feeds)})[0]


def test_unmapped_ops_export_generically_and_ort_agrees(tmp_path):
    torch.manual_seed(0)
    model, x = Mixed().eval(), torch.randn(16, 3, 16, 16)
    sim = QuantSim(model, x[:1], "w8a8")
    sim.calibrate([x], progress=False)
    export_onnx(sim, tmp_path / "m.onnx", opset=17)
    m = onnx.load(tmp_path / "m.onnx")
    onnx.checker.check_model(m, full_check=True)  # ReduceMean in its opset-17 form
    ops = Counter(n.op_type for n in m.graph.node)
    assert ops["LayerNormalization"] == 1 and ops["Erf"] == 1 and ops["Transpose"] == 2
    # no node without a reader: the generic path resolved its inputs a second time, leaving a DequantizeLinear that
    # ONNX Runtime still ran (42 in all-MiniLM-L6-v2's export)
    read = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    assert [n.name for n in m.graph.node if not set(n.output) & read] == []
    out = _ort(tmp_path / "m.onnx", [x.numpy()])
    with torch.no_grad():
        ref = sim(x).numpy()
    assert sqnr_db(torch.from_numpy(ref), torch.from_numpy(out)) > 30
    assert (out.argmax(1) == ref.argmax(1)).mean() == 1.0
    # the batch axis stays dynamic through the spliced ops
    assert _ort(tmp_path / "m.onnx", [x[:3].numpy()]).shape == (3, 5)


class TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(dim=1))


def test_embedding_exports_with_integer_token_ids(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (8, 12))
    sim = QuantSim(TokenModel().eval(), ids[:1], "w8a8")
    sim.calibrate([ids], progress=False)
    export_onnx(sim, tmp_path / "t.onnx")
    m = onnx.load(tmp_path / "t.onnx")
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    out = _ort(tmp_path / "t.onnx", [ids.numpy()])
    with torch.no_grad():
        ref = sim(ids).numpy()
    assert np.abs(out - ref).max() < 1e-4 * max(1.0, np.abs(ref).max()) or sqnr_db(torch.from_numpy(ref), torch.from_numpy(out)) > 30


class EmbeddingOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)

    def forward(self, ids):
        return self.emb(ids)


@pytest.mark.parametrize("preset", ["w8a8", "w8a8_per_tensor"])
def test_embedding_gathers_integer_rows_before_dequantizing(tmp_path, preset):
    """No DequantizeLinear of the whole table on every run: Gather the integer rows, then dequantize them
    (DequantizeLinear's arithmetic): the same values as the sim, to the bit."""
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (4, 7))
    sim = QuantSim(EmbeddingOnly().eval(), ids[:1], preset)
    sim.calibrate([ids], progress=False)
    sim.disable(sim.output_quantizers())  # compare the dequantized rows themselves
    export_onnx(sim, tmp_path / "e.onnx")
    m = onnx.load(tmp_path / "e.onnx")
    assert not any(n.op_type == "DequantizeLinear" and "emb.weight" in n.input for n in m.graph.node)
    gathers = [n for n in m.graph.node if n.op_type == "Gather" and "emb.weight" in n.input]
    assert len(gathers) == 1
    out = _ort(tmp_path / "e.onnx", [ids.numpy()])
    with torch.no_grad():
        assert np.array_equal(out, sim(ids).numpy())


class Squeeze(nn.Module):
    """A squeeze-and-excitation-like pool whose outputs span a sliver of its input's range."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x)).flatten(1))


def test_global_pool_grid_is_never_finer_than_input_step_over_count(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 2, 32, 32) * 1e-3
    x[:, :, 0, 0], x[:, :, 5, 5] = 50.0, -50.0  # pooled values near 0, input range +-50
    sim = QuantSim(Squeeze().eval(), x[:1], "w8a8")
    sim.calibrate([x], progress=False)
    q_in, q_out = sim.quantizers()["conv"], sim.quantizers()["pool"]
    assert float(q_out.scale) >= float(q_in.scale) / (32 * 32) * 0.999
    export_onnx(sim, tmp_path / "se.onnx")
    out = _ort(tmp_path / "se.onnx", [x.numpy()])  # ORT's QLinearGlobalAveragePool accepts the multiplier
    with torch.no_grad():
        ref = sim(x).numpy()
    assert np.abs(out - ref).max() <= 1.001 * float(sim.quantizers()["fc"].scale) + 1e-6


def test_dict_outputs_are_named_by_their_keys_and_stochastic_depth_is_an_identity(tmp_path):
    from torchvision.ops import stochastic_depth

    class Seg(nn.Module):  # torchvision segmentation models return {"out": ..., "aux": ...}
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            h = torch.relu(self.a(x))
            h = h + stochastic_depth(h, 0.2, "row", self.training)
            return {"out": self.b(h), "aux": h}

    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stochastic_depth is known: no "left in float" warning
        sim = QuantSim(Seg().eval(), x)
    sim.calibrate([torch.randn(4, 3, 8, 8)], progress=False)
    path = export_onnx(sim, tmp_path / "seg.onnx")["onnx"]
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [o.name for o in s.get_outputs()] == ["out", "aux"]
    got = dict(zip(["out", "aux"], s.run(None, {"x": x.numpy()})))
    with torch.no_grad():
        ref = sim(x)
    for k in ("out", "aux"):
        assert sqnr_db(ref[k], torch.from_numpy(got[k])) > 30


class Tokens(nn.Module):
    """Idioms of timm's vision transformers and ConvMixer: ``x.flatten(2).transpose(1, 2)`` (ONNX Flatten is
    always 2-D), ``unsqueeze`` of quantized values, a conv with ``padding="same"`` and one called twice."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding="same")
        self.shared = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.shared(torch.relu(self.shared(self.stem(x))))
        t = x.flatten(2).transpose(1, 2)  # (N, HW, C)
        t = t.unsqueeze(1).squeeze(1)
        return self.fc(t).mean(1)


def test_flatten_from_dim_2_unsqueeze_same_padding_and_a_shared_conv_export(tmp_path):
    torch.manual_seed(0)
    model, x = Tokens().eval(), torch.randn(8, 3, 10, 12)
    sim = QuantSim(model, x[:1], "w8a8")
    sim.calibrate([x], progress=False)
    export_onnx(sim, tmp_path / "m.onnx")
    m = onnx.load(tmp_path / "m.onnx")
    assert sum(i.name == "shared.weight" for i in m.graph.initializer) == 1
    out = _ort(tmp_path / "m.onnx", [x.numpy()])
    with torch.no_grad():
        ref = sim(x).numpy()
    assert out.shape == ref.shape and sqnr_db(torch.from_numpy(ref), torch.from_numpy(out)) > 30


class Masked(nn.Module):
    """timm idioms: an optional ``attn_mask=None`` the example does not give, a bool mask made with
    ``.to(torch.bool)`` and inverted, ``x.to(self.conv.weight.dtype)`` and ``div(rounding_mode="floor")``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x, attn_mask=None):
        y = self.conv(x)
        t = y.flatten(2).transpose(1, 2)
        y = y + F.scaled_dot_product_attention(t, t, t, attn_mask=attn_mask).transpose(1, 2).reshape(y.shape)
        mask = torch.zeros((y.shape[0], y.shape[2], y.shape[3])).to(torch.bool)
        pos = (~mask).cumsum(1, dtype=torch.float32).to(self.conv.weight.dtype)
        y = y + torch.div(pos, 2, rounding_mode="floor").unsqueeze(1)
        return self.fc(y.mean((2, 3)))


def test_optional_arguments_casts_and_floor_division_export(tmp_path):
    torch.manual_seed(0)
    model, x = Masked().eval(), torch.randn(2, 3, 6, 6)
    sim = QuantSim(model, x, "w8a8")
    assert [n.name for n in sim.model.graph.nodes if n.op == "placeholder"] == ["x"]  # attn_mask traced as None
    sim.calibrate([x], progress=False)
    with pytest.warns(UserWarning, match="batch size"):
        export_onnx(sim, tmp_path / "m.onnx")  # the mask is built from the batch size: the recorded batch
    out = _ort(tmp_path / "m.onnx", [x.numpy()])
    with torch.no_grad():
        ref = sim(x).numpy()
    assert sqnr_db(torch.from_numpy(ref), torch.from_numpy(out)) > 30


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x) + x)  # fx names this add "add"; the ReLU fused after it has the quantizer


class _TopAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.block = _Residual()
        self.other = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.block(self.stem(x))
        return x + self.other(x)  # the top-level add's quantizer is named "add" too


def test_a_quantizer_name_equal_to_another_nodes_name_exports(tmp_path):
    """timm's HRNet: the export wrote two values named 'add' (ONNX requires single assignment)."""
    torch.manual_seed(0)
    model, x = _TopAdd().eval(), torch.randn(2, 3, 8, 8)
    sim = QuantSim(model, x, "w8a8")
    assert "add" in sim.quantizers() and "add" in [n.name for n in sim.model.graph.nodes]
    sim.calibrate([x], progress=False)
    export_onnx(sim, tmp_path / "m.onnx")
    onnx.checker.check_model(onnx.load(tmp_path / "m.onnx"), full_check=True)
    out = _ort(tmp_path / "m.onnx", [x.numpy()])
    with torch.no_grad(), sim.integer_exact():
        assert np.array_equal(sim(x).numpy(), out)


class _Tiled(nn.Module):
    """timm's Hiera: a window position embedding tiled over the feature map by sizes read from the input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(1, 4, 2, 2))

    def forward(self, x):
        y = self.conv(x)
        y = y + self.pos.tile((y.shape[2] // 2, y.shape[3] // 2))
        return y.repeat(1, 1, 1, 1).mean((2, 3))


def test_tile_and_repeat_by_folded_sizes_export_as_tile(tmp_path):
    torch.manual_seed(0)
    model, x = _Tiled().eval(), torch.randn(2, 3, 8, 6)
    sim = QuantSim(model, x, "w8a8")
    sim.calibrate([x], progress=False)
    export_onnx(sim, tmp_path / "m.onnx")
    m = onnx.load(tmp_path / "m.onnx")
    assert not any(n.op_type in ("If", "Loop") for n in m.graph.node) and any(n.op_type == "Tile" for n in m.graph.node)
    out = _ort(tmp_path / "m.onnx", [x.numpy()])
    with torch.no_grad():
        assert sqnr_db(sim(x), torch.from_numpy(out)) > 30


class _Folded(nn.Module):
    """``F.fold`` (volo's outlook attention folds patches back): ONNX's Col2Im, defined from opset 18 only."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(2, 4, 1)

    def forward(self, x):
        y = self.c1(x).flatten(2)  # (N, 2 * 2 * 2, 64 blocks)
        return self.c2(F.fold(y, output_size=(16, 16), kernel_size=2, stride=2))


def test_an_op_that_needs_a_later_opset_raises_the_default_opset(tmp_path):
    torch.manual_seed(0)
    model, x = _Folded().eval(), torch.randn(4, 3, 8, 8)
    sim = QuantSim(model, x[:1], "w8a8")
    sim.calibrate([x], progress=False)
    info = export_onnx(sim, tmp_path / "m.onnx")
    assert info["opset"] == 18 and any(n.op_type == "Col2Im" for n in onnx.load(tmp_path / "m.onnx").graph.node)
    with torch.no_grad():
        assert sqnr_db(sim(x), torch.from_numpy(_ort(tmp_path / "m.onnx", [x.numpy()]))) > 30
    with pytest.raises(Exception, match="version 18"):  # an opset the user chose is kept: the error says which one works
        export_onnx(sim, tmp_path / "m17.onnx", opset=17)


class _DeadBranch(nn.Module):
    """A residual block whose branch is dead (its last layer's weights and bias are zero), on tiny values."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.branch = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 4, 1, bias=False)  # a bias on the tiny grid s_in s_w would saturate int32
        with torch.no_grad():
            self.branch.weight.zero_()
            self.branch.bias.zero_()

    def forward(self, x):
        y = torch.relu(self.stem(x))  # an unsigned grid: the add output (signed) stores another zero point
        return self.head(y + self.branch(y))


def test_an_add_input_that_saw_only_zeros_takes_the_output_scale(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8) * 1e-6  # the add's output scale ~1e-8: a scale of 1 for the dead input broke ORT's add
    sim = QuantSim(_DeadBranch().eval(), x[:1], "w8a8")
    with pytest.warns(Warning, match="saw only zeros"):
        sim.calibrate([x], progress=False)
    qs = sim.quantizers()
    assert float(qs["branch"].scale) == float(qs["add"].scale)
    export_onnx(sim, tmp_path / "dead.onnx")
    out = _ort(tmp_path / "dead.onnx", [x.numpy()])
    with torch.no_grad():
        with sim.quantization_disabled():
            ref = sim(x)
        with sim.integer_exact():
            exact = sim(x)
    assert torch.equal(exact, torch.from_numpy(out))
    assert sqnr_db(ref, torch.from_numpy(out)) > 30  # was -11 dB: the add lost its zero point to float32 cancellation
