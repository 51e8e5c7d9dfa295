"""Quantized LSTM / GRU / RNN: the float twin equals torch, the quantized one puts every tensor on its grid."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import edgequant as eq
from edgequant.config import Override, QuantConfig, QuantSpec
from edgequant.nn import Quantizer
from edgequant.nn.rnn import convert_recurrent

CASES = [
    (nn.LSTM, {}),
    (nn.LSTM, dict(num_layers=2, bidirectional=True, batch_first=True)),
    (nn.LSTM, dict(num_layers=2, proj_size=3)),
    (nn.GRU, dict(num_layers=2, bidirectional=True)),
    (nn.GRU, dict(batch_first=True, bias=False)),
    (nn.RNN, dict(nonlinearity="relu", num_layers=2)),
    (nn.RNN, dict(bidirectional=True)),
]


def _twin(layer):
    return convert_recurrent(copy.deepcopy(layer), {}, {})


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "data") and not isinstance(out, torch.Tensor):  # PackedSequence
        return [out.data]
    return [t for o in out if o is not None for t in _flat(o)]


def _assert_same(a, b, atol=1e-5):
    fa, fb = _flat(a), _flat(b)
    assert len(fa) == len(fb)
    for x, y in zip(fa, fb):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("cls,kw", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_unquantized_twin_equals_torch_forward_and_backward(cls, kw):
    torch.manual_seed(0)
    ref = cls(5, 8, **kw)
    twin = _twin(ref)
    assert type(twin).__name__ == f"Quantized{cls.__name__}" and isinstance(twin, cls)
    assert list(twin.state_dict())[:len(ref.state_dict())] == list(ref.state_dict())
    x = torch.randn(4, 6, 5)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    o1, o2 = ref(x1), twin(x2)
    _assert_same(o1, o2)
    sum(t.sum() for t in _flat(o1)).backward()
    sum(t.sum() for t in _flat(o2)).backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4)
    for (n, p), q in zip(ref.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_twin_with_initial_states_unbatched_and_packed_sequences(cls):
    torch.manual_seed(1)
    ref = cls(3, 4, num_layers=2, bidirectional=True)
    twin = _twin(ref)
    h0 = torch.randn(4, 2, 4)
    hx = (h0, torch.randn(4, 2, 4)) if cls is nn.LSTM else h0
    x = torch.randn(5, 2, 3)
    _assert_same(ref(x, hx), twin(x, hx))
    hx1 = tuple(t[:, 0] for t in hx) if cls is nn.LSTM else h0[:, 0]
    _assert_same(ref(x[:, 0], hx1), twin(x[:, 0], hx1))  # unbatched: (time, features)
    lengths = torch.tensor([5, 2, 4])
    xs = torch.randn(5, 3, 3)
    for enforce_sorted, lens in ((False, lengths), (True, torch.tensor([5, 4, 2]))):
        packed = pack_padded_sequence(xs, lens, enforce_sorted=enforce_sorted)
        a, b = ref(packed), twin(packed)
        assert torch.equal(a[0].batch_sizes, b[0].batch_sizes)
        _assert_same(a, b)


def test_dropout_between_layers_in_training_only():
    torch.manual_seed(2)
    twin = _twin(nn.LSTM(3, 6, num_layers=2, dropout=0.5))
    x = torch.randn(4, 2, 3)
    twin.train()
    assert not torch.equal(twin(x)[0], twin(x)[0])
    twin.eval()
    assert torch.equal(twin(x)[0], twin(x)[0])


def test_wrong_initial_state_shape_is_a_clear_error():
    twin = _twin(nn.GRU(3, 4, num_layers=2))
    with pytest.raises(ValueError, match=r"h0 must have shape \(2, 5, 4\)"):
        twin(torch.randn(7, 5, 3), torch.zeros(1, 5, 4))
    with pytest.raises(ValueError, match="3 features"):
        _twin(nn.GRU(4, 4))(torch.randn(7, 5, 3))


class _Classifier(nn.Module):
    def __init__(self, cls=nn.LSTM, **kw):
        super().__init__()
        self.rnn = cls(6, 16, batch_first=True, **kw)
        self.fc = nn.Linear(16 * (2 if kw.get("bidirectional") else 1), 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


def _sqnr(ref, y):
    ref, y = ref.detach(), y.detach()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - y).pow(2).sum()))


@pytest.mark.parametrize("cls,kw", [(nn.LSTM, {}), (nn.GRU, dict(num_layers=2, bidirectional=True)), (nn.RNN, {})],
                         ids=["LSTM", "GRU-2-bi", "RNN"])
def test_quantsim_puts_every_rnn_tensor_on_its_grid(cls, kw):
    torch.manual_seed(3)
    model = _Classifier(cls, **kw).eval()
    x = torch.randn(64, 10, 6)
    sim = eq.QuantSim(model, x[:2], "w8a8")
    assert sim.capture_mode == "graph"
    qs = sim.quantizers()
    sites = [n for n in sim.plan if n.startswith("rnn.") and sim.plan[n].role == "activation"]
    assert sites and all(n in qs for n in sites)
    assert "x" in qs  # the model input goes on a grid before the recurrent layer
    with sim.quantization_disabled():
        torch.testing.assert_close(sim(x), model(x), atol=1e-5, rtol=1e-4)
    sim.calibrate([x[:32], x[32:]], progress=False)
    y = sim(x)
    assert _sqnr(model(x), y) > 25
    # every planned tensor really is on its grid: quantizing the recorded values again changes nothing
    seen = {}
    hooks = [q.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (m, o))) for n, q in qs.items() if not q.is_weight]
    sim(x[:4])
    for h in hooks:
        h.remove()
    for n, (q, o) in seen.items():
        assert torch.equal(q(o), o), n
    if cls is nn.LSTM:
        assert qs["rnn.l0.c"].spec.bits == 16 and qs["rnn.l0.i"].is_frozen
        assert abs(float(qs["rnn.l0.i"].scale) - 1 / 255) < 1e-9 and int(qs["rnn.l0.i"].zero_point) == 0
    # biases sit on the int32 grid s_x * s_w of their matmul
    layer = sim.model.rnn
    b = layer._b("bias_ih_l0", qs["x"], "weight_ih_l0").detach()
    s = float(qs["x"].scale) * layer.param_quantizers["weight_ih_l0"].scale.detach().reshape(-1).double()
    assert torch.allclose((b.double() / s), (b.double() / s).round(), atol=1e-3)
    assert not torch.equal(b, layer.bias_ih_l0.detach())


def test_cell_state_bits_follow_a_name_override_and_eight_bits_cost_more():
    torch.manual_seed(4)
    model = _Classifier(nn.LSTM).eval()
    x = torch.randn(64, 10, 6)
    results = {}
    for bits in (16, 8):
        cfg = QuantConfig.preset("w8a8")
        if bits == 8:
            cfg = QuantConfig(cfg.weight, cfg.activation, module_names={"rnn.*.c": Override(activation=QuantSpec(bits=8, symmetric=True))})
        sim = eq.QuantSim(model, x[:2], cfg)
        sim.calibrate([x], progress=False)
        assert sim.quantizers()["rnn.l0.c"].spec.bits == bits
        results[bits] = _sqnr(model(x), sim(x))
    assert results[16] > results[8] - 0.5


def test_quantized_lstm_trains_and_round_trips(tmp_path):
    torch.manual_seed(5)
    model = _Classifier(nn.LSTM, num_layers=2).eval()
    x = torch.randn(32, 8, 6)
    sim = eq.QuantSim(model, x[:2], "w8a8")
    sim.calibrate([x], progress=False)
    sim.train()
    loss = sim(x).pow(2).mean()
    loss.backward()
    grads = {n: p.grad for n, p in sim.named_parameters() if "rnn" in n}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items()), [n for n, g in grads.items() if g is None]
    sim.eval()
    before = sim(x)
    sim.save(tmp_path / "s")
    again = eq.load(tmp_path / "s")
    assert torch.equal(again(x), before)
    assert isinstance(again.model.rnn.tensor_quantizers["l1__h"], Quantizer)


def test_learned_ranges_train_through_the_recurrence_and_the_result_exports(tmp_path):
    import numpy as np
    import onnxruntime as ort

    from edgequant.qat import finetune, prepare_qat
    torch.manual_seed(6)
    model = _Classifier(nn.GRU).eval()
    x = torch.randn(64, 10, 6)
    sim = eq.QuantSim(model, x[:2], "w4a8")
    sim.calibrate([x], progress=False)
    learning = prepare_qat(sim)
    assert "rnn.l0.h" in learning and "rnn.weight_hh_l0" in learning
    before = {n: float(q.scale.detach().reshape(-1)[0]) for n, q in sim.quantizers().items()}
    finetune(sim, list(x.split(16)), steps=8, teacher=model, lr=1e-3, progress=False)
    after = {n: float(q.scale.detach().reshape(-1)[0]) for n, q in sim.quantizers().items()}
    assert after["rnn.l0.h"] != before["rnn.l0.h"] and after["rnn.l0.hn"] != before["rnn.l0.hn"]
    eq.export_onnx(sim, tmp_path / "q.onnx")
    s = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad(), sim.integer_exact("float32"):
        exact = sim(x).numpy()
    assert np.array_equal(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0], exact)
