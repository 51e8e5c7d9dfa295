"""AIMET (aimet-torch 2.42) on the row-by-row MNIST LSTM / GRU classifiers of issue 12 (``bench_rnn_peers.py``).

Documented entry points: ``aimet_torch.quantsim.QuantizationSimModel(model, dummy_input, quant_scheme,
default_output_bw, default_param_bw, config_file)`` and ``sim.compute_encodings(forward_pass_callback, args)``
run over the 512 calibration digits; ``sim.model`` is then evaluated on the 1,000 test digits.

* Config: ``config_file=None``, i.e. AIMET's ``"default"`` alias = ``default_config_per_channel.json``: symmetric
  weights, biases not quantized, every op's output quantized, the model input quantized; per-channel weights only
  for the op types it lists (Conv, ConvTranspose, Gemm, MatMul, PRelu), so the ``nn.Linear`` classifier gets
  per-channel weights and the LSTM / GRU weights get per-tensor ones (AIMET's config has no LSTM/GRU entry).
  ``quant_scheme`` left at the constructor's default (``QuantScheme.min_max`` in 2.42 when None); rows with
  ``post_training_tf_enhanced`` (AIMET's recommended PTQ scheme, used by ``run_aimet.py``) are added.
* What AIMET quantizes inside the recurrent layer: ``nn.LSTM`` / ``nn.GRU`` become
  ``aimet_torch.nn.true_quant.QuantizedLSTM`` / ``QuantizedGRU``. Their forward quantizes the weight matrices
  (``weight_ih_l*``, ``weight_hh_l*``; biases float) and the layer's boundary tensors (input sequence; initial
  h0/c0 when given; output sequence, h_n, c_n), then calls ``torch._VF.lstm`` / ``_VF.gru`` in float: the gate
  pre-activations, sigmoid/tanh outputs and the per-step hidden and cell states inside the 28-step recurrence
  stay float. Each row's notes list the quantizers actually found on the layer (bit width, per-channel or not).
* W4A8: ``default_param_bw=4`` (activations stay on 8 bits).
"""
from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository (edgequant)

import torch

torch.set_num_threads(1)

import aimet_torch
from aimet_torch.common.defs import QuantScheme
from aimet_torch.quantsim import QuantizationSimModel
from bench_rnn_peers import PeerRows, as_is, load_model, load_split, runner_args, selected


def _desc(q) -> str:
    if q is None:
        return "-"
    bw = getattr(q, "bitwidth", "?")
    shape = tuple(getattr(q, "shape", ()) or ())
    per_ch = any(s > 1 for s in shape)
    return f"{bw}b{' per-channel' if per_ch else ''}"


def describe(sim_model) -> str:
    """The quantizers on the recurrent layer and the classifier, as AIMET set them up (grouped)."""
    parts = []
    for name in ("rnn", "classifier"):
        m = getattr(sim_model, name)
        ins = [_desc(q) for q in m.input_quantizers]
        outs = [_desc(q) for q in m.output_quantizers]
        groups = {}
        for k, q in m.param_quantizers.items():
            kind = "weights" if k.startswith("weight") else "biases"
            groups.setdefault((kind, _desc(q)), []).append(k)
        pq = ", ".join(f"{len(v)} {kind} {d}" for (kind, d), v in groups.items())
        parts.append(f"{name} ({type(m).__name__}): inputs [{', '.join(ins)}] params [{pq}] outputs [{', '.join(outs)}]")
    return " / ".join(parts)


def quantize(net, cal, param_bw: int, scheme):
    kw = {} if scheme is None else {"quant_scheme": scheme}
    sim = QuantizationSimModel(net, dummy_input=cal[0][:1], default_output_bw=8, default_param_bw=param_bw,
                               config_file=None, **kw)

    def forward(model, _):
        with torch.no_grad():
            for b in cal:
                model(b)

    sim.compute_encodings(forward, None)
    sim.model.eval()
    return sim.model, describe(sim.model)


CONFIGS = {  # config -> (default_param_bw, quant_scheme or None for the constructor's default)
    "W8A8 (default config, min_max)": (8, None),
    "W4A8 (default config, min_max)": (4, None),
    "W8A8 (default config, tf_enhanced)": (8, QuantScheme.post_training_tf_enhanced),
    "W4A8 (default config, tf_enhanced)": (4, QuantScheme.post_training_tf_enhanced),
}


def main():
    args = runner_args()
    rec = PeerRows("aimet", aimet_torch.__version__)
    for entry in selected(args):
        xcal, xte, yte = load_split(entry["split"])
        cal = list(xcal.split(64))
        net = load_model(entry)
        rec.row(entry, "FP32 (reloaded here)", partial(as_is, net), xte, yte)
        for config, (bw, scheme) in CONFIGS.items():
            rec.row(entry, config, partial(quantize, net, cal, bw, scheme), xte, yte)


if __name__ == "__main__":
    main()
