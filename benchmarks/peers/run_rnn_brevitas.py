"""Brevitas 0.13 on the row-by-row MNIST LSTM / GRU classifiers of issue 12 (``bench_rnn_peers.py``).

Documented entry points: ``brevitas.nn.QuantLSTM`` (Brevitas' quantized recurrent layer: it unrolls the
recurrence and quantizes inside it), ``brevitas.nn.QuantLinear`` for the classifier, and
``brevitas.graph.calibrate.calibration_mode`` (the PTQ calibration context its examples use) run over the 512
calibration digits.

* The float weights are copied in with ``QuantLSTM.load_state_dict`` on the ``nn.LSTM`` state_dict: Brevitas'
  own ``_load_from_state_dict`` maps ``weight_ih_l{k}[_reverse]`` / ``weight_hh_l*`` / ``bias_*`` onto its
  per-gate ``GateParams`` (the two biases summed). A check runs the copy with every quantizer off
  (``quantization_status_manager``) and records the largest logit difference to the float model in the notes.
* QuantLSTM defaults (kept): ``Int8WeightPerTensorFloat`` weights, ``Int32Bias``, ``Int8ActPerTensorFloat``
  for the input/hidden output (``io_quant``), the four gate accumulators and the tanh outputs,
  ``Uint8ActPerTensorFloat`` sigmoid outputs and an 8-bit cell state (``cell_state_quant``): every internal
  tensor of the recurrence on 8 bits. The io and cell-state quantizers are shared by all layers and directions
  (its design). The classifier: ``QuantLinear`` with the same weight quantizer and an 8-bit output.
* Rows: W8A8 with those defaults (per-tensor weights), W8A8 with ``Int8WeightPerChannelFloat`` weights, W4A8
  (``weight_bit_width=4``) per-channel and per-tensor; activations stay as above.
* GRU: Brevitas 0.13 provides ``QuantRNN`` and ``QuantLSTM`` only; the GRU rows record the error raised when
  looking its quantized GRU up (``brevitas.nn.QuantGRU``), not a number.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository (edgequant)

import torch  # noqa: E402

torch.set_num_threads(1)

import brevitas  # noqa: E402
import brevitas.nn as qnn  # noqa: E402
from bench_rnn_peers import PeerRows, load_model, load_split, runner_args, selected  # noqa: E402
from brevitas.graph.calibrate import calibration_mode, quantization_status_manager  # noqa: E402
from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Int8WeightPerTensorFloat  # noqa: E402

CONFIGS = {  # config -> (weight quantizer, weight bits)
    "W8A8 (QuantLSTM defaults: per-tensor weights, 8-bit internals)": (Int8WeightPerTensorFloat, 8),
    "W8A8 per-channel weights": (Int8WeightPerChannelFloat, 8),
    "W4A8 per-channel weights": (Int8WeightPerChannelFloat, 4),
    "W4A8 per-tensor weights": (Int8WeightPerTensorFloat, 4),
}


def quantize(net, entry, cal, weight_quant, bits):
    if entry["cell"] != "lstm":
        getattr(qnn, f"Quant{entry['cell'].upper()}")  # raises AttributeError: brevitas has no such layer
    q = copy.deepcopy(net)
    q.rnn = qnn.QuantLSTM(28, entry["hidden"], num_layers=entry["layers"], bidirectional=entry["bidirectional"],
                          batch_first=True, weight_quant=weight_quant, weight_bit_width=bits)
    res = q.rnn.load_state_dict(copy.deepcopy(net.rnn.state_dict()), strict=False)
    if res.unexpected_keys or any("weight" in k and "quant" not in k for k in res.missing_keys):
        raise RuntimeError(f"weights not copied: missing {res.missing_keys} unexpected {res.unexpected_keys}")
    lin = net.classifier
    q.classifier = qnn.QuantLinear(lin.in_features, lin.out_features, bias=True, weight_quant=weight_quant,
                                   weight_bit_width=bits, output_quant=Int8ActPerTensorFloat)
    q.classifier.load_state_dict(lin.state_dict(), strict=False)
    q.eval()
    with torch.no_grad(), quantization_status_manager(q, disable_act_quant=True, disable_weight_quant=True,
                                                      disable_bias_quant=True):
        diff = float((q(cal[0]) - net(cal[0])).abs().max())
    with torch.no_grad(), calibration_mode(q):
        for b in cal:
            q(b)
    q.eval()
    return q, f"quantizers off: max |logit - float logit| = {diff:.2e} on 64 digits"


def main():
    args = runner_args()
    rec = PeerRows("brevitas", brevitas.__version__)
    for entry in selected(args):
        xcal, xte, yte = load_split(entry["split"])
        cal = list(xcal.split(64))
        net = load_model(entry)
        rec.row(entry, "FP32 (reloaded here)", lambda: (net, "the float model in this environment"), xte, yte)
        for config, (wq, bits) in CONFIGS.items():
            rec.row(entry, config, lambda: quantize(net, entry, cal, wq, bits), xte, yte)


if __name__ == "__main__":
    main()
