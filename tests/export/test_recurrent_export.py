"""Quantized LSTM / GRU / RNN exported to ONNX: ONNX Runtime computes what the integer-exact sim computes."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import edgequant as eq
from edgequant.config import Override, QuantConfig, QuantSpec
from edgequant.errors import ExportError
from edgequant.models.mnist_rnn import RowRNN


class Seq(nn.Module):
    def __init__(self, cls, **kw):
        super().__init__()
        self.rnn = cls(6, 16, batch_first=True, **kw)

    def forward(self, x):
        out, _ = self.rnn(x)
        return out


class WithState(Seq):
    def forward(self, x, h0):
        out, _ = self.rnn(x, h0)
        return out


class WithStates(Seq):
    def forward(self, x, h0, c0):
        out, _ = self.rnn(x, (h0, c0))
        return out


def _ort(path, x):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


def _sim(model, x, config="w8a8"):
    sim = eq.QuantSim(model, x[:2], config)
    sim.calibrate([x], progress=False)
    return sim


CASES = [(nn.LSTM, {}), (nn.LSTM, dict(num_layers=2, proj_size=4)), (nn.GRU, dict(num_layers=2, bidirectional=True)),
         (nn.RNN, dict(nonlinearity="relu", bidirectional=True))]


@pytest.mark.parametrize("cls,kw", CASES, ids=["LSTM", "LSTM-2-proj", "GRU-2-bi", "RNN-relu-bi"])
def test_onnx_runtime_equals_the_integer_exact_sim(tmp_path, cls, kw):
    torch.manual_seed(0)
    x = torch.randn(24, 9, 6)
    sim = _sim(Seq(cls, **kw).eval(), x)
    eq.export_onnx(sim, tmp_path / "m.onnx")
    got = _ort(tmp_path / "m.onnx", x)
    with torch.no_grad(), sim.integer_exact("float32"):
        exact = sim(x).numpy()
    assert np.array_equal(got, exact)
    ops = {n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node}
    assert {"MatMulInteger", "Gather", "QuantizeLinear"} <= ops and not ops & {"LSTM", "GRU", "RNN", "Sigmoid", "Tanh"}
    with torch.no_grad():
        assert float(np.abs(sim(x).numpy() - got).max()) <= float(sim.model.rnn.tensor_quantizers[f"l{sim.model.rnn.num_layers - 1}__h"].scale) + 1e-6


def test_a_classifier_on_the_last_hidden_state_and_an_8_bit_cell_export_exactly(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(32, 28, 28)
    eight = Override(activation=QuantSpec(bits=8, symmetric=True, range_method="minmax"))
    base = QuantConfig.preset("w8a8")
    for config in ("w8a8", QuantConfig(base.weight, base.activation, module_names={"rnn.*.c": eight})):
        sim = _sim(RowRNN("lstm", 24).eval(), x, config)
        info = eq.export_onnx(sim, tmp_path / "c.onnx")
        with torch.no_grad(), sim.integer_exact("float32"):
            exact = sim(x).numpy()
        assert np.array_equal(_ort(tmp_path / "c.onnx", x), exact)
        assert info["opset"] == (21 if config == "w8a8" else 17)  # a 16-bit cell state needs int16 (opset 21)


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
def test_initial_states_given_to_the_layer_export_onto_their_grids(tmp_path, cls):
    from edgequant.export.integer import IntegerEngine
    torch.manual_seed(2)
    x = torch.randn(8, 5, 6)
    state = (0.5 * torch.randn(2, 8, 16),) + ((torch.randn(2, 8, 16),) if cls is nn.LSTM else ())
    model = (WithStates if cls is nn.LSTM else WithState)(cls, num_layers=2).eval()
    sim = eq.QuantSim(model, (x[:2],) + tuple(t[:, :2] for t in state))
    sim.calibrate([(x,) + state], progress=False)
    eq.export_onnx(sim, tmp_path / "s.onnx", example_inputs=(x,) + state)
    s = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    got = s.run(None, {i.name: t.numpy() for i, t in zip(s.get_inputs(), (x,) + state)})[0]
    with torch.no_grad(), sim.integer_exact("float32"):
        exact = sim(x, *state)
    assert np.array_equal(got, exact.numpy())
    assert torch.equal(IntegerEngine(sim, "float32")(x, *state), exact)
    with torch.no_grad():
        assert not torch.equal(sim(x, *state), sim(x, *(torch.zeros_like(t) for t in state)))


def test_what_is_not_exported_is_refused_by_name(tmp_path):
    torch.manual_seed(2)
    x = torch.randn(8, 5, 6)
    sim = _sim(Seq(nn.LSTM).eval(), x)
    with pytest.raises(ValueError, match="requant='float32'"), torch.no_grad(), sim.integer_exact("fixed_point"):
        sim(x)
    sim.disable("rnn.l0.c")
    with pytest.raises(ExportError, match="rnn: .*quantized and calibrated: l0.c of a quantized LSTM is not"):
        eq.export_onnx(sim, tmp_path / "d.onnx")


@pytest.mark.parametrize("cell,layers,bi", [("lstm", 1, False), ("gru", 2, True)])
def test_integer_engine_runs_the_same_cell(tmp_path, cell, layers, bi):
    from edgequant.errors import IntegerEngineError
    from edgequant.export.integer import IntegerEngine
    torch.manual_seed(3)
    x = torch.randn(16, 28, 28)
    sim = _sim(RowRNN(cell, 24, layers, bi).eval(), x)
    if not bi:  # the classifier reads h_n[-1] straight from the layer: its bias is on the hidden grid's int32 grid
        assert sim.model.classifier._bias_input[0] is sim.model.rnn.tensor_quantizers
    with torch.no_grad(), sim.integer_exact("float32"):
        exact = sim(x)
    assert torch.equal(IntegerEngine(sim, "float32")(x), exact)
    eq.export_onnx(sim, tmp_path / "e.onnx")
    assert np.array_equal(_ort(tmp_path / "e.onnx", x), exact.numpy())
    with pytest.raises(IntegerEngineError, match="rnn: quantized .* requant='float32'"):
        IntegerEngine(sim)  # the fixed-point default
