"""Brevitas 0.13 on the row-by-row MNIST LSTM / GRU classifiers of issue 12 (``bench_rnn_peers.py``).

Documented entry points: ``brevitas.nn.QuantLSTM`` (Brevitas' quantized recurrent layer: it unrolls the
recurrence and quantizes inside it), ``brevitas.nn.QuantLinear`` for the classifier, and
``brevitas.graph.calibrate.calibration_mode`` (the PTQ calibration context its examples use) run over the 512
calibration digits.

* The float weights are copied in with ``QuantLSTM.load_state_dict`` on the ``nn.LSTM`` state_dict: Brevitas'
  own ``_load_from_state_dict`` maps ``weight_ih_l{k}[_reverse]`` / ``weight_hh_l*`` / ``bias_*`` onto its
  per-gate ``GateParams`` (the two biases summed). A check builds the same ``QuantLSTM`` with every quantizer
  ``None``, loads the same way, and records its largest logit difference to the float model in the notes.
* QuantLSTM defaults (kept): ``Int8WeightPerTensorFloat`` weights, ``Int32Bias``, ``Int8ActPerTensorFloat``
  for the input/hidden output (``io_quant``), the four gate accumulators and the tanh outputs,
  ``Uint8ActPerTensorFloat`` sigmoid outputs and an 8-bit cell state (``cell_state_quant``): every internal
  tensor of the recurrence on 8 bits. The io and cell-state quantizers are shared by all layers and directions
  (its design). The classifier: ``QuantLinear`` with the same weight quantizer and an 8-bit output.
* Rows: W8A8 with those defaults (per-tensor weights), W8A8 with ``Int8WeightPerChannelFloat`` weights, W4A8
  (``weight_bit_width=4``) per-channel and per-tensor; activations stay as above.
* ``io_quant`` is ONE quantizer for the layer's input sequence (the normalized pixels, up to ~2.8) and its hidden
  state / output (within [-1, 1]); ``calibration_mode`` averages its statistics over every call, 28 hidden-state
  calls per input call, so the calibrated range follows the hidden state and the pixels are clipped. The notes
  give the calibrated io range and the largest calibration pixel. A diagnostic row "io_quant=None" (with
  ``bias_quant=None``, which Brevitas then requires) keeps the input and hidden state in float and everything else
  as the W8A8 defaults, to show how much of the drop comes from that shared quantizer.
* GRU: Brevitas 0.13 provides ``QuantRNN`` and ``QuantLSTM`` only; the GRU rows record the error raised when
  looking its quantized GRU up (``brevitas.nn.QuantGRU``), not a number.
"""
from __future__ import annotations

import copy
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository (edgequant)

import torch

torch.set_num_threads(1)

import brevitas
import brevitas.nn as qnn
from bench_rnn_peers import PeerRows, as_is, load_model, load_split, runner_args, selected
from brevitas.graph.calibrate import calibration_mode
from brevitas.quant import (
    Int8ActPerTensorFloat,
    Int8WeightPerChannelFloat,
    Int8WeightPerTensorFloat,
)

CONFIGS = {  # config -> (weight quantizer, weight bits, extra QuantLSTM kwargs)
    "W8A8 (QuantLSTM defaults: per-tensor weights, 8-bit internals)": (Int8WeightPerTensorFloat, 8, {}),
    "W8A8 per-channel weights": (Int8WeightPerChannelFloat, 8, {}),
    "W4A8 per-channel weights": (Int8WeightPerChannelFloat, 4, {}),
    "W4A8 per-tensor weights": (Int8WeightPerTensorFloat, 4, {}),
    "diagnostic: W8A8 defaults but io_quant=None (input + hidden state float)":
        (Int8WeightPerTensorFloat, 8, {"io_quant": None, "bias_quant": None}),
}


def lstm_of(net, entry, **kw):
    rnn = qnn.QuantLSTM(28, entry["hidden"], num_layers=entry["layers"], bidirectional=entry["bidirectional"],
                        batch_first=True, **kw)
    res = rnn.load_state_dict(copy.deepcopy(net.rnn.state_dict()), strict=False)
    if res.unexpected_keys or any("quant" not in k for k in res.missing_keys):
        raise RuntimeError(f"weights not copied: missing {res.missing_keys} unexpected {res.unexpected_keys}")
    return rnn


def copy_check(net, entry, x) -> float:
    """The float path of the copy: the same QuantLSTM with every quantizer None must match nn.LSTM."""
    twin = copy.deepcopy(net)
    twin.rnn = lstm_of(net, entry, weight_quant=None, bias_quant=None, io_quant=None, gate_acc_quant=None,
                       sigmoid_quant=None, tanh_quant=None, cell_state_quant=None).eval()
    with torch.no_grad():
        return float((twin(x) - net(x)).abs().max())


def quantize(net, entry, cal, weight_quant, bits, extra):
    if entry["cell"] != "lstm":
        getattr(qnn, f"Quant{entry['cell'].upper()}")  # raises AttributeError: brevitas has no such layer
    q = copy.deepcopy(net)
    q.rnn = lstm_of(net, entry, weight_quant=weight_quant, weight_bit_width=bits, **extra)
    lin = net.classifier
    q.classifier = qnn.QuantLinear(lin.in_features, lin.out_features, bias=True, weight_quant=weight_quant,
                                   weight_bit_width=bits, output_quant=Int8ActPerTensorFloat)
    res = q.classifier.load_state_dict(lin.state_dict(), strict=False)
    if res.unexpected_keys or "weight" in res.missing_keys or "bias" in res.missing_keys:
        raise RuntimeError(f"classifier not copied: {res}")
    with torch.no_grad(), calibration_mode(q):
        for b in cal:
            q(b)
    q.eval()
    notes = [f"copy check (all quantizers None): max |logit diff| {copy_check(net, entry, cal[0]):.1e}"]
    io = q.rnn.layers[0][0].io_quant
    if io.is_quant_enabled:
        amax = float(io.scale()) * (2 ** (float(io.bit_width()) - 1) - 1)
        notes.append(f"calibrated io_quant range +-{amax:.2f} (shared by input pixels, max {float(torch.cat(cal).abs().max()):.2f}, "
                     f"and hidden state)")
    return q, "; ".join(notes)


def main():
    args = runner_args()
    rec = PeerRows("brevitas", brevitas.__version__)
    for entry in selected(args):
        xcal, xte, yte = load_split(entry["split"])
        cal = list(xcal.split(64))
        net = load_model(entry)
        rec.row(entry, "FP32 (reloaded here)", partial(as_is, net), xte, yte)
        for config, (wq, bits, extra) in CONFIGS.items():
            rec.row(entry, config, partial(quantize, net, entry, cal, wq, bits, extra), xte, yte)


if __name__ == "__main__":
    main()
