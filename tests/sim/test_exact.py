"""The sim's integer-exact mode against ONNX Runtime's integer kernels and the integer engine."""
import warnings
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgequant import NotCalibratedError, QuantSim, export_onnx
from edgequant.config.spec import QuantConfig
from edgequant.core import requant as rq
from edgequant.export.integer import IntegerEngine
from edgequant.ptq import cross_layer_equalization


def _sim(model, x, cfg):
    sim = QuantSim(model, x[:1], cfg)
    sim.calibrate([x[i:i + 64] for i in range(0, 256, 64)], progress=False)
    return sim


def _exact_and_ort(model, cal, x, path, **options):
    """``(sim, mode, exact, ort_out, onnx_path)``: ``model`` quantized at W8A8 on ``cal``, exported with ``options``
    (``tables=``, ``float64=``) and run on ``x`` by ONNX Runtime and by the integer-exact sim with the same options."""
    sim = QuantSim(model.eval(), cal[0], "w8a8")
    sim.calibrate(cal, progress=False)
    path = export_onnx(sim, path, **options)["onnx"]
    out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad(), sim.integer_exact(**options) as mode:
        exact = sim(x)
    return sim, mode, exact, torch.from_numpy(out), path


@pytest.mark.parametrize("cfg,cle", [("w8a8", False), ("w7a8", False), ("w8a8_per_tensor", False), ("w8a8_per_tensor", True)])
def test_integer_exact_sim_is_bit_exact_with_onnx_runtime_and_the_engine(folded, tmp_path, cfg, cle):
    model, x = folded
    if cle:
        model, _ = cross_layer_equalization(model, fold=False)
    sim = _sim(model, x, cfg)
    xe = x[1000:1400]
    info = export_onnx(sim, tmp_path / "m.onnx")
    # 7-bit weights go in int8 (ORT's u8s8 kernels cannot saturate on them), 8-bit ones in uint8
    assert info["weight_dtype"] == ("int8" if cfg == "w7a8" else "uint8")
    path = info["onnx"]
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ort_out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: xe.numpy()})[0])
    with sim.integer_exact("float32"):
        exact32 = sim(xe)
    with sim.integer_exact("fixed_point"):
        exact_fp = sim(xe)
    assert torch.equal(exact32, ort_out)  # every logit, bit for bit
    assert torch.equal(exact32, IntegerEngine(sim, requant="float32")(xe))
    assert torch.equal(exact_fp, IntegerEngine(sim, requant="fixed_point")(xe))
    # outside the context the sim is the plain float sim again, within a step of the exact one
    with torch.no_grad():
        plain = sim(xe)
    step = float(sim.quantizers()["fc"].scale)
    assert ((plain - exact32).abs() / step <= 1.001).double().mean() >= 0.99
    assert all(q._exact is None for q in sim.quantizers().values())


def test_integer_exact_needs_a_calibrated_graph_sim_and_a_known_mode(folded):
    model, x = folded
    sim = QuantSim(model, x[:1], "w8a8")
    with pytest.raises(NotCalibratedError), sim.integer_exact():
        pass
    with pytest.raises(ValueError, match="requant must be one of"):
        sim.integer_exact("float16")


def test_float32_add_depends_on_the_stored_zero_points():
    """ORT computes the add with the zero points as stored (uint8, +128 for a signed grid); the
    offsets must be passed or near-ties round differently. Grids of MobileNetV2's features.6.add,
    every pair of int8 inputs."""
    s_a, s_b, s_y = float.fromhex("0x1.97abf8p-6"), float.fromhex("0x1.d98e44p-7"), float.fromhex("0x1.e7c888p-6")
    qa, qb = torch.meshgrid(torch.arange(-128, 128), torch.arange(-128, 128), indexing="ij")
    qa, qb = qa.reshape(-1), qb.reshape(-1)
    args = (qa, s_a, 3, qb, s_b, 4, s_y, 3, -128, 127, "float32")
    shifted = rq.add(*args, offsets=(128, 128, 128))
    plain = rq.add(*args)
    exact = torch.round(((qa - 3) * s_a + (qb - 4) * s_b) / s_y + 3).clamp(-128, 127).long()
    assert (shifted - exact).abs().max() <= 1 and (plain - exact).abs().max() <= 1
    assert 0 < int((shifted != plain).sum()) < 20  # the representation moves float rounding at a few near-ties
    fp = rq.add(*args[:-1], "fixed_point")  # fixed point and float32 agree except near ties
    assert (fp != shifted).double().mean() < 1e-2


def test_requantize_float32_is_float32_arithmetic():
    acc = torch.tensor([[1000, -2047, 123457]])
    got = rq.requantize(acc, 0.02, torch.tensor([0.003]), 0.05, 10, -128, 127, "float32")
    m = np.float32(np.float32(0.02) * np.float32(0.003)) / np.float32(0.05)
    ref = np.clip(np.rint(acc.numpy().astype(np.float32) * np.float32(m)) + 10, -128, 127)
    assert got.tolist() == ref.astype(np.int64).tolist()


class _Gate(torch.nn.Module):
    """A squeeze-excitation-like product of two quantized tensors (``QLinearMul`` once exported)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(3, 8, 1)
        for m in (self.a, self.b):
            torch.nn.init.normal_(m.weight, generator=g)

    def forward(self, x):
        return torch.relu(self.a(x)) * torch.sigmoid(self.b(x))


def test_a_product_of_two_quantized_tensors_is_onnx_runtimes_qlinearmul(tmp_path):
    x = torch.randn(256, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    sim = _sim(_Gate().eval(), x, "w8a8")
    qs = sim.quantizers()
    # where the two formulas round a tie differently, only ORT's own arithmetic matches it
    ort_out = torch.from_numpy(_on_ties(sim, ("relu", "sigmoid", "mul"), "QLinearMul", x, tmp_path))
    ints = {}
    hooks = [qs[n].register_forward_hook(lambda m, i, o, n=n: ints.__setitem__(n, o)) for n in ("relu", "sigmoid", "mul")]
    with sim.integer_exact("float32"):
        exact = sim(x)
    for h in hooks:
        h.remove()
    assert torch.equal(exact, ort_out)  # every output, bit for bit
    # the float product then a division by the output scale (what the plain path computes) rounds some of
    # these near-ties the other way: this input exercises the difference
    qm = qs["mul"]
    plain = torch.clamp(torch.round(ints["relu"] * ints["sigmoid"] / qm.scale) + qm.zero_point, qm.qmin, qm.qmax)
    assert (plain != torch.round(exact / qm.scale) + qm.zero_point).sum() > 0


def _on_ties(sim, names, kernel, x, tmp_path):
    """Give the product ``names[2]`` of ``names[0]`` and ``names[1]`` the output scale ``2 s_a s_b``, which puts every odd
    product of integers on a rounding tie; export, check that ONNX Runtime runs ``kernel``, and return its output."""
    qs = sim.quantizers()
    a, b, out = (qs[n] for n in names)
    s_y = torch.tensor(2 * float(a.scale) * float(b.scale), dtype=torch.float32)
    out._set(s_y.reshape(out.scale.shape), out.zero_point)
    path = export_onnx(sim, tmp_path / "m.onnx")["onnx"]
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert kernel in {n.op_type for n in _optimized(sess, path, tmp_path)}
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _optimized(sess, path, tmp_path):
    """The node list ORT runs after its graph optimizations (saved to a file to read back)."""
    import onnx

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return onnx.load(so.optimized_model_filepath).graph.node


def test_a_bias_beyond_int32_warns_and_the_accumulator_wraps_as_in_onnx_runtime(tmp_path):
    """A linear layer whose input range is nearly empty: its bias is far beyond int32 on the grid s_in * s_w."""
    torch.manual_seed(0)
    x = torch.randn(32, 64) * 1e-6
    fc = torch.nn.Linear(64, 8)
    with torch.no_grad():
        fc.bias.fill_(0.5)
    sim = QuantSim(torch.nn.Sequential(fc).eval(), x[:1], "w8a8")
    with pytest.warns(UserWarning, match="beyond int32"):
        sim.calibrate([x], progress=False)
    path = export_onnx(sim, tmp_path / "m.onnx")["onnx"]
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with sim.integer_exact("float32"):
        exact = sim(x).numpy()
    assert np.array_equal(out, exact)  # the clamped bias plus a positive sum wraps around in int32
    with pytest.raises(Exception, match="overflow"):  # the reference engine refuses instead
        IntegerEngine(sim, "float32")(x)


class _Shared(torch.nn.Module):
    """One conv applied to two inputs on different grids (a detector head on each feature level)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.stem, self.head = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 8, 3, padding=1)
        for m in (self.stem, self.head):
            torch.nn.init.normal_(m.weight, generator=g)
            torch.nn.init.normal_(m.bias, std=3.0, generator=g)

    def forward(self, x):
        f = torch.relu(self.stem(x))
        g = torch.relu(self.stem(x * 5.0))
        return torch.cat([self.head(f).flatten(1), self.head(g).flatten(1)], dim=1)


def test_a_layer_called_on_two_grids_is_exact_per_call(tmp_path):
    x = torch.randn(64, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    sim = _sim(_Shared().eval(), x, "w8a8")
    path = export_onnx(sim, tmp_path / "m.onnx")["onnx"]
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with sim.integer_exact("float32"):
        exact = sim(x).numpy()
    # each call's accumulator is recovered on its own input grid, with its bias on that grid (the export writes
    # the bias once per call); the layer's single bias grid was off for the other call
    assert np.array_equal(out, exact)


def test_integer_exact_names_the_quantizers_that_read_float_computations():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.ln = torch.nn.Linear(16, 16), torch.nn.LayerNorm(16)

        def forward(self, x):
            return self.fc(self.ln(x)).softmax(dim=-1)

    torch.manual_seed(0)
    x = torch.randn(8, 4, 16)
    sim = _sim(Block().eval(), x, "w8a8")
    with pytest.warns(UserWarning, match="LayerNorm x1, softmax x1"):
        with sim.integer_exact() as mode:
            sim(x)
    assert sorted(mode.float_computed.values()) == ["LayerNorm", "softmax"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per sim
        with sim.integer_exact():
            sim(x)
    cnn = _sim(_Gate().eval(), torch.randn(16, 3, 8, 8), "w8a8")  # conv, relu, sigmoid: only the sigmoid is float
    with pytest.warns(UserWarning, match="Sigmoid|sigmoid"):
        with cnn.integer_exact() as mode:
            pass
    assert list(mode.float_computed.values()) == ["sigmoid"]


class _Attn(torch.nn.Module):
    """A product of two quantized tensors, one of them transposed (attention's q k^T)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(3, 8, 1)

    def forward(self, x):
        q = torch.relu(self.a(x)).flatten(2)
        k = self.b(x).flatten(2)
        return torch.matmul(q, k.transpose(1, 2)).flatten(1)


def test_a_matmul_of_two_quantized_tensors_is_onnx_runtimes_qlinearmatmul(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(64, 3, 6, 6)
    sim = _sim(_Attn().eval(), x, "w8a8")
    # only the exact integer product requantized as QLinearMatMul does lands where ORT does
    out = _on_ties(sim, ("relu", "b", "matmul"), "QLinearMatMul", x, tmp_path)
    with sim.integer_exact("float32") as mode:
        exact = sim(x).numpy()
    assert np.array_equal(out, exact) and "matmul" not in mode.float_computed


class _WideResidual(nn.Module):
    """Tokens through a residual MLP: under ``w8a8_transformer`` with every op output quantized the residual sum is a
    16-bit grid and ``fc2``, read
    only by it, writes that grid too (exported as ``MatMulInteger`` and a float32 rescale)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc3(x + self.fc2(torch.relu(self.fc1(x))))


def test_a_linear_writing_a_16_bit_grid_computes_the_exports_float32_rescale(tmp_path):
    import onnx

    torch.manual_seed(0)
    cal = [torch.randn(4, 10, 16) * 4 for _ in range(2)]
    every_output = replace(QuantConfig.preset("w8a8_transformer"), activation_placement="outputs")
    sim = QuantSim(_WideResidual().eval(), cal[0], every_output)
    sim.calibrate(cal, progress=False)
    assert sim.quantizers()["fc2"].spec.bits == 16
    path = export_onnx(sim, tmp_path / "w.onnx")["onnx"]
    assert "MatMulInteger" in {n.op_type for n in onnx.load(path).graph.node}
    x = torch.randn(256, 10, 16) * 4
    out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad(), sim.integer_exact() as mode:
        exact = sim(x)
    assert "fc2" not in mode.float_computed  # computed as the export computes it, not flagged
    assert torch.equal(exact, torch.from_numpy(out))


class _ClassToken(nn.Module):
    """PiT's pattern: a class token beside patch tokens, the patches sliced off by a length read from a shape,
    reshaped to a grid for a conv; the head reads the class token."""

    def __init__(self):
        super().__init__()
        self.embed, self.mix, self.conv, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Conv2d(8, 3, 3, padding=1), nn.Linear(8, 3)

    def forward(self, x):  # x: (N, 1 + 16, 8)
        t = self.mix(self.embed(x))
        n = x.shape[1] - 16
        grid = t[:, n:].transpose(1, 2).reshape(x.shape[0], 8, 4, 4)
        return self.head(t[:, 0]) + self.conv(grid).mean((2, 3))


def test_layers_reading_selected_tokens_run_on_the_integers(tmp_path):
    torch.manual_seed(0)
    cal = [torch.randn(4, 17, 8) for _ in range(2)]
    x = torch.randn(64, 17, 8)
    _, mode, exact, out, _ = _exact_and_ort(_ClassToken(), cal, x, tmp_path / "t.onnx")
    assert not {"conv", "head"} & set(mode.float_computed)  # their inputs' grids found through the selections
    assert torch.equal(exact, out)


class _SplitHeads(nn.Module):
    """TinyViT's attention: one projection split into q, k and v (``split`` with sizes), both products on their
    integers."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x):
        q, k, v = self.qkv(x).split([8, 8, 8], dim=-1)
        a = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        return self.out(a @ v)


def test_products_of_split_projections_run_on_the_integers(tmp_path):
    torch.manual_seed(0)
    cal = [torch.randn(4, 6, 8) for _ in range(2)]
    x = torch.randn(32, 6, 8)
    _, mode, exact, out, _ = _exact_and_ort(_SplitHeads(), cal, x, tmp_path / "s.onnx", float64=True)
    assert not [n for n, kind in mode.float_computed.items() if kind == "matmul"], mode.float_computed
    assert torch.equal(exact, out)


class _MixedConv(nn.Module):
    """MixNet's mixed depthwise/pointwise conv: the channels split into groups, each read by its own conv, then
    concatenated (SKNet's paths split a max-pool's output instead)."""

    def __init__(self, pool=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 1, 1) if pool else nn.Identity()
        self.a, self.b = nn.Conv2d(4, 16, 1, bias=False), nn.Conv2d(8, 16, 3, padding=1, bias=False)

    def forward(self, x):
        parts = torch.split(self.pool(self.stem(x)), [4, 8], 1)
        return torch.cat([self.a(parts[0]), self.b(parts[1])], 1)


def test_convs_reading_split_parts_requantize_as_the_export(tmp_path):
    torch.manual_seed(0)
    cal = [torch.randn(4, 3, 12, 12) for _ in range(2)]
    x = torch.randn(64, 3, 12, 12)
    _, mode, exact, out, _ = _exact_and_ort(_MixedConv(), cal, x, tmp_path / "m.onnx")
    assert not {"a", "b"} & set(mode.float_computed)  # their input's grid found through the split
    assert torch.equal(exact, out)


class _PatchMean(nn.Module):
    """BEiT's head: the mean of the patch tokens, the class token left out (``x[:, 1:].mean(dim=1)``)."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.fc(x)[:, 1:].mean(dim=1))


def test_a_mean_of_selected_tokens_averages_the_selection(tmp_path):
    torch.manual_seed(0)
    cal = [torch.randn(8, 50, 16) for _ in range(2)]
    x = torch.randn(32, 50, 16)
    _, _, exact, out, _ = _exact_and_ort(_PatchMean(), cal, x, tmp_path / "m.onnx")
    # the integer mean summed every token, the class token too, once its input grid was found through the selection
    assert torch.equal(exact, out)


def test_split_parts_of_a_max_pool_run_on_the_integers(tmp_path):
    """SKNet's ``maxpool -> split -> convs``: ONNX Runtime moves a DequantizeLinear past a float MaxPool but not past a
    Split, so the export pools the integers there, and the exact mode requantizes the convs as ORT's QLinearConv."""
    from edgequant.graph import lowering

    torch.manual_seed(0)
    cal = [torch.randn(4, 3, 12, 12) for _ in range(2)]
    x = torch.randn(64, 3, 12, 12)
    sim, mode, exact, out, _ = _exact_and_ort(_MixedConv(pool=True), cal, x, tmp_path / "m.onnx")
    modules = dict(sim.model.named_modules())
    convs = [n for n in sim.model.graph.nodes if n.op == "call_module" and n.target in ("a", "b")]
    assert all(lowering.source_quantizer(c.args[0], modules) is not None for c in convs)
    assert not {"a", "b"} & set(mode.float_computed)
    assert torch.equal(exact, out)


class _GatedSplit(nn.Module):
    """MambaOut's gated block: one projection split into a gate, which goes through GELU, and a value."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 24), nn.Linear(16, 8)
        self.act = nn.GELU()

    def forward(self, x):
        g, v = torch.split(self.fc1(x), [8, 16], dim=-1)
        return self.fc2(torch.cat([self.act(g), v[..., :8]], -1))


def test_a_table_reads_the_codes_of_its_part_of_a_split(tmp_path):
    torch.manual_seed(0)
    cal = [torch.randn(4, 6, 8) for _ in range(2)]
    x = torch.randn(16, 6, 8)
    # the exact mode looked the whole projection up in the GELU's table (a shape error)
    _, mode, exact, out, _ = _exact_and_ort(_GatedSplit(), cal, x, tmp_path / "g.onnx", tables=True)
    assert "act" not in mode.float_computed
    assert torch.equal(exact, out)


class _Cropped(nn.Module):
    """LowFormer's crop after its upsampling, ``o[..., :h, :w]``, added to another branch."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(4, 8, 1)

    def forward(self, x):
        return self.a(x)[..., :10, :10] + self.b(x)[..., 2:, 2:]


def test_crops_with_an_ellipsis_move_the_integers(tmp_path):
    torch.manual_seed(0)
    cal = [torch.randn(8, 4, 12, 12) for _ in range(2)]
    x = torch.randn(64, 4, 12, 12)
    _, mode, exact, out, path = _exact_and_ort(_Cropped(), cal, x, tmp_path / "c.onnx")
    assert [n.op_type for n in onnx.load(path).graph.node].count("Slice") == 4  # on the stored integers
    assert "add" not in mode.float_computed  # ORT fuses QLinearAdd: the exact mode adds the integers as it does
    assert torch.equal(exact, out)


class _PooledShortcut(nn.Module):
    """MViTv2's pooled residual: the shortcut max-pooled (and reshaped) before it is added to the attention output."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.Conv2d(4, 8, 1)

    def forward(self, x):
        short = torch.nn.functional.max_pool2d(self.b(x), 3, 2, 1).flatten(2)
        return self.a(x).flatten(2) + short


def test_adds_reading_a_max_pool_add_its_integers(tmp_path):
    torch.manual_seed(0)
    cal = [torch.randn(8, 4, 12, 12) for _ in range(2)]
    x = torch.randn(64, 4, 12, 12)
    _, mode, exact, out, _ = _exact_and_ort(_PooledShortcut(), cal, x, tmp_path / "p.onnx")
    # ORT moves the DequantizeLinear past the float MaxPool and the Reshape and fuses QLinearAdd
    assert "add" not in mode.float_computed
    assert torch.equal(exact, out)


class _CropToInput(nn.Module):
    """LowFormer's ``o[..., :H, :W]`` with ``H, W = x.shape[-2:]``: a crop whose sizes are read from a shape."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 8, 3, padding=2), nn.Conv2d(4, 8, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        return self.a(x)[..., :h, :w] + self.b(x)


def test_crops_to_sizes_read_from_shapes_move_the_integers(tmp_path):
    torch.manual_seed(0)
    cal = [torch.randn(8, 4, 12, 12) for _ in range(2)]
    x = torch.randn(64, 4, 12, 12)
    _, mode, exact, out, _ = _exact_and_ort(_CropToInput(), cal, x, tmp_path / "c.onnx")
    assert "add" not in mode.float_computed  # the crop's sizes read from the input's codes as the forward runs
    assert torch.equal(exact, out)


class _SamePool(nn.MaxPool2d):
    """timm's MaxPool2dSame: TensorFlow's "same" padding with -inf in its own forward, then a max-pool."""

    def forward(self, x):
        return torch.nn.functional.max_pool2d(torch.nn.functional.pad(x, (0, 1, 0, 1), value=-float("inf")), 3, 2)


class _SamePoolNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.pool, self.conv = nn.Conv2d(3, 8, 3, padding=1), _SamePool(3, 2), nn.Conv2d(8, 8, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.conv(self.pool(self.act(self.stem(x))))


def test_a_layer_after_an_own_forward_pool_is_listed_as_float_computed(tmp_path):
    """The pool is exported from its forward (Pad with -inf, then MaxPool) in float, and ORT's QDQ propagation stops at
    the Pad, so ORT runs the conv after it in float: the exact mode requantized it as an integer QLinearConv."""
    from edgequant.graph import lowering

    torch.manual_seed(0)
    cal = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    sim = QuantSim(_SamePoolNet().eval(), cal[0], "w8a8")
    sim.calibrate(cal, progress=False)
    modules = dict(sim.model.named_modules())
    conv = next(n for n in sim.model.graph.nodes if n.target == "conv")
    assert lowering.source_quantizer(conv.args[0], modules) is None
    with torch.no_grad(), sim.integer_exact() as mode:
        sim(cal[0])
    assert "conv" in mode.float_computed  # said, not silently different
