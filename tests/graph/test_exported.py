"""The torch.export capture path: models torch.fx cannot trace, raised back to layer level."""
import warnings

import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgequant import QuantSim, export_onnx
from edgequant.graph import ops
from edgequant.graph.exported import capture_exported
from edgequant.metrics import sqnr_db


class TinyEncoder(nn.Module):
    """What stops torch.fx in Hugging Face models: a buffer sliced with a traced size, and an additive
    attention mask built from integer inputs."""

    def __init__(self, vocab=50, d=16, seq=12):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.register_buffer("position_ids", torch.arange(seq).unsqueeze(0), persistent=False)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, input_ids, attention_mask):
        n = input_ids.shape[1]
        h = self.norm(self.tok(input_ids) + self.pos(self.position_ids[:, :n]))
        mask = (1.0 - attention_mask[:, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        scores = self.q(h) @ self.k(h).transpose(1, 2) / 4.0 + mask
        h = self.norm(h + self.o(torch.softmax(scores, -1) @ self.v(h)))
        w = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * w).sum(1) / w.sum(1))


def _inputs(batch, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[: batch // 2, seq - 3:] = 0
    return ids, mask


def test_export_capture_keeps_layers_and_the_model_output():
    torch.manual_seed(0)
    m = TinyEncoder().eval()
    ids, mask = _inputs(1)
    gm = capture_exported(m, (ids, mask), {})
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"tok", "pos", "q", "k", "v", "o", "norm", "head"} <= called
    assert any(n.target is ops.add_mask for n in gm.graph.nodes)  # the mask add keeps its input's grid
    for batch in (1, 5):  # a batch of one at capture does not fix the batch size
        x = _inputs(batch, seed=batch)
        with torch.no_grad():
            assert torch.equal(gm(*x), m(*x))


def test_untraceable_model_is_quantized_in_graph_mode_and_exported(tmp_path):
    torch.manual_seed(0)
    m = TinyEncoder().eval()
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        sim = QuantSim(m, _inputs(4), "w8a8_transformer")
    assert sim.capture_mode == "graph"
    qs = sim.quantizers()
    assert {"q", "k", "v", "tok.weight", "pos.weight"} <= set(qs)
    assert qs["norm"].spec.bits == 16  # the residual stream of the transformer preset
    assert not any("add_mask" in n for n in qs)  # no quantizer after the mask: its -3.4e38 would take the grid
    data = [_inputs(8, seed=s) for s in range(4)]
    sim.calibrate(data, progress=False)
    x = _inputs(8, seed=9)
    with torch.no_grad():
        ref, got = m(*x), sim(*x)
    assert sqnr_db(ref, got) > 18
    keys_hidden = x[0].clone()
    keys_hidden[: 4, -3:] = 7  # other tokens where the mask hides them: the quantized attention ignores them too
    with torch.no_grad():
        assert torch.equal(sim(keys_hidden, x[1])[:4], got[:4])
    path = export_onnx(sim, tmp_path / "tiny.onnx", dynamic_batch=False, example_inputs=x)["onnx"]
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = s.run(None, {"input_ids": x[0].numpy(), "attention_mask": x[1].numpy()})[0]
    assert sqnr_db(got, torch.from_numpy(out)) > 30


def test_export_of_other_batch_size_takes_example_inputs(tmp_path):
    m = TinyEncoder().eval()
    sim = QuantSim(m, _inputs(4), "w8a8_transformer")
    sim.calibrate([_inputs(8, seed=s) for s in range(2)], progress=False)
    x = _inputs(3, seed=5)
    path = export_onnx(sim, tmp_path / "b3.onnx", dynamic_batch=False, example_inputs=x)["onnx"]
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [d.shape for d in s.get_inputs()] == [[3, 12], [3, 12]]
    out = s.run(None, {"input_ids": x[0].numpy(), "attention_mask": x[1].numpy()})[0]
    with torch.no_grad():
        assert sqnr_db(sim(*x), torch.from_numpy(out)) > 30
    assert all(n.meta.get("tensor_meta") is None or n.meta["tensor_meta"].shape[0] != 3
               for n in sim.model.graph.nodes if n.op == "placeholder")  # the sim's own shapes are restored


def test_a_graph_that_builds_tensors_from_the_batch_size_exports_with_a_fixed_batch(tmp_path):
    class BatchBuilds(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) * torch.ones(x.size(0), 1)

    sim = QuantSim(BatchBuilds().eval(), torch.randn(2, 4))
    sim.calibrate([torch.randn(8, 4)], progress=False)
    with pytest.raises(Exception, match="builds a tensor from the batch size.*dynamic_batch=False"):
        export_onnx(sim, tmp_path / "dyn.onnx", dynamic_batch=True)  # asked for: refused
    assert not (tmp_path / "dyn.onnx").exists()
    x = torch.randn(2, 4)
    with pytest.warns(UserWarning, match="builds a tensor from the batch size.*keeps the batch size"):
        path = export_onnx(sim, tmp_path / "auto.onnx")["onnx"]  # the default: the recorded batch, said so
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path2 = export_onnx(sim, tmp_path / "static.onnx", dynamic_batch=False)["onnx"]
    for p in (path, path2):
        s = ort.InferenceSession(p, providers=["CPUExecutionProvider"])
        assert s.get_inputs()[0].shape == [2, 4]
        out = s.run(None, {"x": x.numpy()})[0]
        with torch.no_grad():
            assert sqnr_db(sim(x), torch.from_numpy(out)) > 30


def test_class_token_expanded_over_the_batch_exports_with_a_dynamic_batch(tmp_path):
    class ClassToken(nn.Module):  # torchvision's ViT: class_token.expand(x.shape[0], -1, -1)
        def __init__(self):
            super().__init__()
            self.cls = nn.Parameter(torch.randn(1, 1, 4))
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            n = x.shape[0]
            return self.fc(torch.cat([self.cls.expand(n, -1, -1), x], dim=1))

    sim = QuantSim(ClassToken().eval(), torch.randn(1, 5, 4))
    sim.calibrate([torch.randn(8, 5, 4)], progress=False)
    path = export_onnx(sim, tmp_path / "cls.onnx")["onnx"]
    x = torch.randn(3, 5, 4)
    out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        assert out.shape == (3, 6, 4) and sqnr_db(sim(x), torch.from_numpy(out)) > 30


def test_export_capture_shares_the_model_parameters():
    m = TinyEncoder().eval()
    m.register_parameter("bias_vec", nn.Parameter(torch.zeros(16)))
    forward = m.forward
    m.forward = lambda input_ids, attention_mask: forward(input_ids, attention_mask) + m.bias_vec[:3]
    gm = capture_exported(m, _inputs(2), {})
    shared = {id(t) for t in gm.parameters()}
    assert id(m.bias_vec) in shared and id(m.q.weight) in shared


def test_export_capture_keeps_convolutions_as_layers():
    class Windowed(nn.Module):  # slices a buffer with a traced size: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.other = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2)
            self.register_buffer("gain", torch.linspace(0.5, 1.5, 16), persistent=False)

        def forward(self, x):
            y = self.other(self.conv(x))
            return y * self.gain[: y.shape[-1]]

    m = Windowed().eval()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(m)
    gm = capture_exported(m, (x,), {})
    assert {n.target for n in gm.graph.nodes if n.op == "call_module"} == {"conv", "other"}
    with torch.no_grad():
        assert torch.equal(gm(torch.randn(3, 3, 16, 16) * 0 + x), m(x.expand(3, -1, -1, -1)))


class _AutocastOff(nn.Module):
    """timm's EfficientViT: attention computed inside ``torch.autocast(enabled=False)``; a shape test fx cannot trace
    sends it through torch.export, which records the region as a higher-order op calling a sub-graph."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        if x.shape[-1] > 2:
            x = self.fc(x)
        with torch.autocast(device_type="cpu", enabled=False):
            y = torch.relu(x) * 2.0 + 1.0
        return self.out(y)


def test_autocast_off_regions_are_inlined_and_export(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    sim = QuantSim(_AutocastOff().eval(), x, "w8a8")
    assert sim.capture_mode == "graph"
    assert not any("autocast" in str(n.target) for n in sim.model.graph.nodes)
    sim.calibrate([x], progress=False)
    path = export_onnx(sim, tmp_path / "m.onnx")["onnx"]
    out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        assert sqnr_db(sim(x), torch.from_numpy(out)) > 30


def test_export_keeps_token_sizes_free_and_fixes_image_sizes():
    """Image sizes left symbolic sent torch.export's solver into minutes on timm's MobileViT-v2 (the sweep timed out)."""
    from edgequant.graph.exported import _dynamic_shapes

    class Two(nn.Module):
        def forward(self, image, ids):
            return image.mean() + ids.sum()

    spec = _dynamic_shapes(Two(), (torch.randn(2, 3, 8, 8), torch.zeros(2, 5, dtype=torch.long)), {})
    assert set(spec["image"]) == {0} and set(spec["ids"]) == {0, 1}


class _ShapeBranchBN(nn.Module):
    """fx cannot trace the shape test; torch.export can, and its batch norms fold like an fx graph's."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        if x.shape[-1] > 4:
            x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.mean((2, 3)))


def test_batch_norms_fold_in_a_model_captured_by_torch_export(tmp_path):
    torch.manual_seed(0)
    net = _ShapeBranchBN().eval()
    net.bn.running_mean.uniform_(-1, 1)
    net.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref = net(x)
    sim = QuantSim(net, x, "w8a8")
    assert sim.bn_folding.folded == [("conv", "bn")] and isinstance(net.bn, nn.BatchNorm2d)  # the user's model untouched
    with torch.no_grad(), sim.quantization_disabled():
        assert sqnr_db(ref, sim(x)) > 60
    sim.calibrate([x], progress=False)
    path = export_onnx(sim, tmp_path / "m.onnx")["onnx"]
    import onnx

    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(path).graph.node)


class _LinearAttention(nn.Module):
    """timm's LiteMLA (EfficientViT) in small: chunk, an in-place activation, no-op ``.float()`` / ``.to(dtype)``, a
    pad with 1.0, slices, and a division by ``sum + eps`` whose sum is zero where a query row is all negative."""

    def __init__(self, c=8, dim=4):
        super().__init__()
        self.dim = dim
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.act = nn.ReLU(inplace=True)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        if h * w < 1:  # a shape test: torch.fx cannot trace it, torch.export can
            raise ValueError("empty image")
        qkv = self.qkv(x).reshape(b, -1, 3 * self.dim, h * w).transpose(-1, -2)
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = torch.relu(q), torch.relu(k)
        v = nn.functional.pad(v, (0, 1), mode="constant", value=1.0)
        q, k, v = q.float(), k.float(), v.to(v.dtype)
        out = q @ (k.transpose(-1, -2) @ v)
        out = out[..., :-1] / (out[..., -1:] + 1e-5)
        return self.act(self.proj(out.transpose(-1, -2).reshape(b, -1, h, w)))


def test_attention_ops_of_torch_export_stay_on_their_grids_and_the_divisor_in_float(tmp_path):
    """torch.export's chunk / slice / no-op casts / in-place hard-swish were unknown float ops: every output got a
    quantizer, so quantizers read quantizers through moves (ONNX Runtime merged such pairs into a grid neither the sim
    nor the encodings had). And a quantizer on ``sum + 1e-5`` rounded it to 0: the sim divided 0 by 0."""
    torch.manual_seed(0)
    m = _LinearAttention().eval()
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(m)
    with torch.no_grad():
        m.qkv.bias[:4] -= 3.0  # the queries of many positions all negative: relu(q) = 0, the divisor is 0 + eps
    x = torch.randn(2, 8, 6, 6)
    gm = capture_exported(m, (x,), {})
    sim = QuantSim(m, x, "w8a8")
    assert sim.capture_mode == "graph" and sim.unsupported == [], sim.unsupported
    assert not any("aten" in str(n.target) for n in sim.model.graph.nodes if n.op == "call_function")
    modules = dict(sim.model.named_modules())
    for n in sim.model.graph.nodes:  # no quantizer reads another's output through moves alone
        if n.op == "call_module" and n.target.startswith("activation_quantizers"):
            src = n.args[0]
            while src.op in ("call_function", "call_method") and ops.kind(src, modules) == "pass":
                src = src.args[0]
            assert not (src.op == "call_module" and src.target.startswith("activation_quantizers")), n.target
    with torch.no_grad():
        assert torch.equal(gm(x), m(x))
        assert (m.qkv(x)[:, :4] < 0).all(1).any()  # some positions divide 0 by eps
    sim.calibrate([x], progress=False)
    with torch.no_grad():
        y = sim(x)
        assert torch.isfinite(y).all()
        assert sqnr_db(m(x), y) > 20
    path = export_onnx(sim, tmp_path / "m.onnx")["onnx"]
    out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad(), warnings.catch_warnings(), sim.integer_exact():
        warnings.simplefilter("ignore")
        assert torch.equal(sim(x), torch.from_numpy(out))


class _MiniSwin(nn.Module):
    """torchvision's own Swin blocks (a shifted one: cyclic roll, an attention mask built by in-place fills) on 8x8
    patches. Their attention is a ``torch.fx.wrap``-ed function that takes ``qkv.weight`` and ``proj.weight`` as
    arguments: traced by fx, those layers were never quantized."""

    def __init__(self):
        super().__init__()
        from torchvision.models.swin_transformer import SwinTransformerBlock

        self.embed = nn.Conv2d(3, 16, 2, stride=2)
        self.blocks = nn.Sequential(*(SwinTransformerBlock(16, 2, [4, 4], [s, s]) for s in (0, 2)))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x).permute(0, 2, 3, 1)).mean((1, 2)))


def test_layers_inside_a_wrapped_function_are_captured_by_torch_export_and_exported_bit_exact(tmp_path):
    torch.manual_seed(0)
    m = _MiniSwin().eval()
    x = torch.randn(4, 3, 16, 16)
    sim = QuantSim(m, x, "w8a8")
    assert sim.capture_mode == "graph" and sim.unsupported == [], sim.unsupported
    assert {"blocks.1.attn.qkv.weight", "blocks.1.attn.proj.weight"} <= set(sim.quantizers())
    assert not any("fill_" in str(n.target) for n in sim.model.graph.nodes)  # the mask is a folded constant
    with torch.no_grad(), sim.quantization_disabled():
        assert torch.allclose(sim(x), m(x), atol=1e-6)
    sim.calibrate([x, torch.randn(4, 3, 16, 16)], progress=False)
    path = export_onnx(sim, tmp_path / "m.onnx", tables=True, float64=True)["onnx"]
    out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad(), warnings.catch_warnings(), sim.integer_exact(tables=True, float64=True):
        warnings.simplefilter("ignore")
        assert torch.equal(sim(x), torch.from_numpy(out))


class _FusedAttention(nn.Module):
    """timm's attention idioms under torch.export: ``qkv.unbind(0)``, ``F.scaled_dot_product_attention`` and an
    in-place ``x.add_(pos)``."""

    def __init__(self, d=16):
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.pos = nn.Parameter(torch.randn(1, 6, d))

    def forward(self, x):
        b, n, d = x.shape
        if n < 1:  # a shape test: torch.fx cannot trace it
            raise ValueError("no tokens")
        x = x.clone()
        x.add_(self.pos)
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, d // 2).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


def test_unbind_attention_and_in_place_add_of_torch_export_are_known_ops():
    torch.manual_seed(0)
    m = _FusedAttention().eval()
    x = torch.randn(3, 6, 16)
    sim = QuantSim(m, x, "w8a8")
    assert sim.capture_mode == "graph" and sim.unsupported == [], sim.unsupported
    with torch.no_grad(), sim.quantization_disabled():
        assert torch.allclose(sim(x), m(x), atol=1e-6)


class _RebuiltBias(nn.Module):
    """A forward that passes its layer's weight with a bias rebuilt from the layer's own (Swin v2 clones ``qkv.bias`` and
    zeroes its key third in place, every call), idempotently or (``twice=True``) not."""

    def __init__(self, twice: bool):
        super().__init__()
        self.fc, self.out, self.twice = nn.Linear(6, 6), nn.Linear(6, 2), twice

    def forward(self, x):
        b = self.fc.bias * 2 if self.twice else self.fc.bias.clone()
        if not self.twice:
            b[2:4].zero_()
        return self.out(torch.relu(nn.functional.linear(x, self.fc.weight, b)))


@pytest.mark.parametrize("twice", [False, True])
def test_a_bias_rebuilt_in_the_forward_is_the_layers_own_when_the_rebuild_is_idempotent(twice):
    torch.manual_seed(0)
    model, x = _RebuiltBias(twice).eval(), torch.randn(3, 6)
    before, ref = model.fc.bias.detach().clone(), model(x)
    gm = capture_exported(model, (x,), {})
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert ("fc" in called) is not twice  # `bias * 2` applied again by the forward would double it: not a layer call
    torch.testing.assert_close(gm(x), ref)
    torch.testing.assert_close(model(x), ref)  # the model computes what it did
    if twice:
        assert torch.equal(model.fc.bias, before)
    else:
        assert torch.equal(model.fc.bias[2:4], torch.zeros(2)) and torch.equal(model.fc.bias[:2], before[:2])


def test_swin_v2_attention_is_quantized_and_bit_exact_in_ort(tmp_path):
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2
    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                            block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = QuantSim(model, x, "w8a8")
    assert sim.unsupported == []
    assert {"features.1.0.attn.qkv.weight", "features.1.0.attn.matmul", "features.1.0.attn.matmul_1"} <= set(sim.quantizers())
    with torch.no_grad(), sim.quantization_disabled():
        torch.testing.assert_close(sim(x), model(x), atol=1e-5, rtol=1e-4)
    sim.calibrate([x, torch.randn(2, 3, 32, 32)], progress=False)
    path = export_onnx(sim, tmp_path / "swinv2.onnx", tables=True, float64=True)["onnx"]
    out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with warnings.catch_warnings(), torch.no_grad(), sim.integer_exact(tables=True, float64=True):
        warnings.simplefilter("ignore")
        assert torch.equal(torch.from_numpy(out), sim(x))


class HFConv1D(nn.Module):
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer with its weight stored transposed, ``(in, out)``."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class TinyDecoder(nn.Module):
    """What decoders and encoder-decoders add: BART's ``shift_tokens_right`` (in-place writes into a selection and a
    ``masked_fill_``), GPT-2's transposed ``Conv1D`` layers and a key cache that starts as an empty tensor."""

    def __init__(self, vocab=50, d=16, seq=12):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.register_buffer("position_ids", torch.arange(seq).unsqueeze(0), persistent=False)
        self.register_buffer("cache", torch.tensor([]), persistent=False)
        self.c_fc, self.c_proj = HFConv1D(32, d), HFConv1D(d, 32)
        self.head = nn.Linear(d, 3)

    def forward(self, input_ids):
        n = input_ids.shape[1]
        shifted = input_ids.new_zeros(input_ids.shape)
        shifted[:, 1:] = input_ids[:, :-1].clone()
        shifted[:, 0] = 7
        shifted.masked_fill_(shifted == 3, 1)
        h = self.tok(shifted) + self.pos(self.position_ids[:, :n])
        h = torch.cat([self.cache, h], dim=-2)  # torch.cat skips a 1-D empty tensor; ONNX's Concat does not
        h = self.c_proj(torch.relu(self.c_fc(h)))
        return self.head(h.mean(1))


def test_decoder_idioms_quantize_and_export_what_the_model_computes(tmp_path):
    torch.manual_seed(0)
    model = TinyDecoder().eval()
    ids = _inputs(8)[0]
    ids[:, 4] = 3  # masked_fill_ has something to replace
    sim = QuantSim(model, ids[:1], "w8a8")
    assert sim.capture_mode == "graph"
    assert sim.plain_convs == {"c_fc": "HFConv1D -> Linear (weight transposed)",
                               "c_proj": "HFConv1D -> Linear (weight transposed)"}
    assert {"c_fc.weight", "c_proj.weight"} <= set(sim.quantizers())  # the transposed linears are quantized layers
    with torch.no_grad(), sim.quantization_disabled():
        torch.testing.assert_close(sim(ids), model(ids))
        fp32 = export_onnx(sim, tmp_path / "f.onnx", dynamic_batch=False, example_inputs=(ids,))["onnx"]
    s = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    # the export computes the decoder's ids after every in-place write (column 0 filled, 3 replaced)
    torch.testing.assert_close(torch.from_numpy(s.run(None, {s.get_inputs()[0].name: ids.numpy()})[0]), model(ids).detach())
    sim.calibrate([ids], progress=False)
    path = export_onnx(sim, tmp_path / "q.onnx", dynamic_batch=False, example_inputs=(ids,))["onnx"]
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = s.run(None, {s.get_inputs()[0].name: ids.numpy()})[0]
    with torch.no_grad(), sim.integer_exact():
        ref = sim(ids).numpy()
    assert (got == ref).all()
    with torch.no_grad():
        torch.testing.assert_close(sim.float_model()(ids), model(ids))


class BucketedPositions(nn.Module):
    """T5's and MPNet's relative-position buckets: the log of token distances (``-inf`` at distance 0) cast to integers
    and looked up in an embedding table whose rows are added to the attention scores."""

    def __init__(self, d=16, buckets=8):
        super().__init__()
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)
        self.rel = nn.Embedding(buckets, 1)
        self.buckets = buckets

    def forward(self, x):
        n = x.shape[1]
        pos = torch.arange(n, device=x.device)
        dist = (pos[None, :] - pos[:, None]).abs().float()
        bucket = (torch.log(dist / 2) * 3).clamp(min=0, max=self.buckets - 1).to(torch.long)
        scores = self.q(x) @ self.k(x).transpose(1, 2) + self.rel(bucket)[..., 0]
        return torch.softmax(scores, -1).mean(1)


def test_float_positions_computed_from_integers_get_no_grid(tmp_path):
    torch.manual_seed(0)
    model = BucketedPositions().eval()
    x = torch.randn(4, 10, 16)
    sim = QuantSim(model, x[:1], "w8a8")
    sim.calibrate([x], progress=False)  # the log's -inf at distance 0 is not calibration data
    assert not any(n.startswith(("log", "truediv", "mul", "abs", "sub")) for n in sim.quantizers()), sorted(sim.quantizers())
    path = export_onnx(sim, tmp_path / "b.onnx", float64=True)["onnx"]
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad(), sim.integer_exact(float64=True):
        ref = sim(x).numpy()
    assert (got == ref).all()


def test_a_sim_captured_by_torch_export_saves_and_loads_bit_for_bit(tmp_path):
    """The captured graph's folded constants are not the model's weights, non-persistent buffers (``position_ids``) are
    saved with the architecture, and a user's architecture gets the sim's rewrites (``Conv1D`` -> ``nn.Linear``)."""
    import edgequant

    torch.manual_seed(0)
    ids = _inputs(8)[0]
    sim = QuantSim(TinyDecoder().eval(), ids[:1], "w8a8")
    sim.calibrate([ids], progress=False)
    sim.save(tmp_path / "s")
    with torch.no_grad():
        ref = sim(ids)
        for loaded in (edgequant.load(tmp_path / "s"), edgequant.load(tmp_path / "s", model=TinyDecoder().eval())):
            assert torch.equal(loaded(ids), ref)
