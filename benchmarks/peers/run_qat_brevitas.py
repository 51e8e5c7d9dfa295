"""Brevitas (0.13) quantization-aware training on the MNIST-5k network at W4A4, for ``bench_qat.py --part peers``
(run in Brevitas' environment).

Its graph-mode path (``brevitas.graph.quantize``): ``preprocess_for_quantize`` (symbolic trace, functional ops to
modules, BatchNorm merged into the convs), ``quantize`` with its default maps at 4 bits, ``calibration_mode`` over the
calibration digits, then a plain torch training loop (Brevitas layers are trainable modules).

* Quantizers: Brevitas' MSE-initialised learned-scale quantizers (``*FloatMSE``: ``PARAMETER_FROM_STATS``, the scale
  a parameter initialised by an MSE search, as edgequant's MSE ranges + LSQ+), ``.let(bit_width=4)``: weights
  ``Int8WeightPerChannelFloatMSE`` (symmetric per-channel, narrow range -7..7), activations
  ``Int8ActPerTensorFloatMSE`` / ``Uint8ActPerTensorFloatMSE`` (symmetric per-tensor, unsigned after ReLU6).
  Biases float (``bias_quant=None``, as edgequant and AIMET here; Brevitas' map default is ``Int32Bias``).
* ReLU6 stays ReLU6 in the float model (``relu6_to_relu=False``; the ImageNet example turns it into ReLU) and
  ``quantize`` maps it, as its default map does, to ``QuantReLU`` (ReLU, then the unsigned 4-bit quantizer, whose
  range clips); the map's default quantizer for ReLU6 (range fixed at [0, 6] before learning) is replaced by the MSE one.
* Input and logits on 8-bit grids, as edgequant's W4A4 rows: ``quantize`` puts a ``QuantIdentity`` on the model input
  and one on the logits; both are replaced by 8-bit ones (``Int8ActPerTensorFloatMSE``) before calibration.

MobileNetV2 (``--model mobilenet``, for ``bench_qat.py --part peers_mobilenet``): torchvision's MobileNetV2 through the
same path at W4A8: 4-bit ``Int8WeightPerChannelFloatMSE`` weights, 8-bit MSE-initialised activations
(``Int8ActPerTensorFloatMSE`` / ``Uint8ActPerTensorFloatMSE``; the model input and the logits 8-bit with the rest),
``calibration_mode`` over the 128 calibration crops (batches of 32), then distillation from the float model
(``bench_qat.peer_qat_mobilenet``). Two variants for the quantizer after each ReLU6:

* ``relu6_max``: Brevitas' default map for ReLU6 (``QuantReLU`` with ``Uint8ActPerTensorFloatMaxInit``,
  ``max_val=6``: a learned scale initialised so the 8-bit grid ends at 6, i.e. it clips where ReLU6 does).
* ``relu6_mse``: as the MNIST rows, the MSE-initialised unsigned quantizer after ``QuantReLU`` (ReLU, not ReLU6):
  values above 6 are clipped only where the MSE range ends.

    python run_qat_brevitas.py <inputs.pt> <out.json> [--steps N] [--lr 1e-3] [--threads 2] [--model mobilenet]
        [--variants relu6_max]
"""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import brevitas  # noqa: E402
import brevitas.nn as qnn  # noqa: E402
import torch  # noqa: E402
from brevitas.graph import quantize as bq  # noqa: E402
from brevitas.graph.calibrate import calibration_mode  # noqa: E402
from brevitas.quant import (  # noqa: E402
    Int8ActPerTensorFloatMSE,
    Int8WeightPerChannelFloatMSE,
    Uint8ActPerTensorFloatMSE,
)



def maps(w_bits: int, a_bits: int, relu6_max: bool = False):
    """``quantize``'s identity, compute-layer and activation maps: ``w_bits`` MSE-initialised per-channel weights
    (biases float), ``a_bits`` MSE-initialised activations; ``relu6_max``: ReLU6 keeps the default map's quantizer
    (learned scale initialised at max 6, at ``a_bits``)."""
    w = Int8WeightPerChannelFloatMSE.let(bit_width=w_bits)
    a, u = Int8ActPerTensorFloatMSE.let(bit_width=a_bits), Uint8ActPerTensorFloatMSE.let(bit_width=a_bits)
    identity = {"signed": (qnn.QuantIdentity, {"act_quant": a, "return_quant_tensor": True}),
                "unsigned": (qnn.QuantIdentity, {"act_quant": u, "return_quant_tensor": True})}
    layers = {k: v if v is None or "weight_quant" not in v[1] else (v[0], dict(v[1], weight_quant=w, bias_quant=None))
              for k, v in bq.COMPUTE_LAYER_MAP.items()}
    relu6 = bq.QUANT_ACT_MAP[torch.nn.ReLU6]
    relu6 = (relu6[0], dict(relu6[1], act_quant=relu6[1]["act_quant"].let(bit_width=a_bits))) if relu6_max else (
        qnn.QuantReLU, {"act_quant": u, "return_quant_tensor": True})
    acts = {**bq.QUANT_ACT_MAP, torch.nn.ReLU6: relu6,
            torch.nn.ReLU: (qnn.QuantReLU, {"act_quant": u, "return_quant_tensor": True})}  # the nets have no other activation
    return identity, layers, acts


IDENTITY, LAYERS, ACTS = maps(4, 4)  # the MNIST rows: W4A4


def io_quantizers(q) -> tuple[str, str]:
    """The names of the QuantIdentity modules ``quantize`` put on the model input and on the model output."""
    nodes = list(q.graph.nodes)
    placeholder = next(n for n in nodes if n.op == "placeholder")
    first = next(iter(placeholder.users))
    last = next(n for n in nodes if n.op == "output").args[0]
    for n in (first, last):
        if n.op != "call_module" or not isinstance(q.get_submodule(n.target), qnn.QuantIdentity):
            raise RuntimeError(f"expected a QuantIdentity at the model's input and output, found {n.format_node()}")
    return first.target, last.target


def describe(q, inp: str, out: str) -> str:
    """What the model quantizes: enabled quantizers by role, bits, sign and granularity."""
    kinds = defaultdict(list)

    def add(where, proxy, name):
        if proxy is None or not proxy.is_quant_enabled:
            return
        scale = proxy.scale()
        gran = "per-channel" if scale is not None and scale.numel() > 1 else "per-tensor"
        sign = "signed" if proxy.is_signed else "unsigned"
        kinds[f"{where}: {int(proxy.bit_width())}-bit {sign} {gran}"].append(name)

    for name, m in q.named_modules():
        if isinstance(m, (qnn.QuantIdentity, qnn.QuantReLU)):
            where = {inp: "model input", out: "logits"}.get(name, type(m).__name__)
            add(where, m.act_quant, name)
        if hasattr(m, "weight_quant"):
            add(f"weight of {type(m).__name__}", m.weight_quant, name)
            for role in ("input_quant", "output_quant"):
                add(f"{role} of {type(m).__name__}", getattr(m, role, None), name)
            if getattr(m, "bias_quant", None) is not None and m.bias_quant.is_quant_enabled:
                kinds["bias quantized"].append(name)
    parts = [f"{k} x{len(v)}" + (f" ({', '.join(v)})" if k.startswith("QuantIdentity") else "") for k, v in sorted(kinds.items())]
    trainable = sum(p.numel() for n, p in q.named_parameters() if p.requires_grad and "quant" in n)
    return "; ".join(parts) + f"; biases float; {trainable} trainable scale values; BN merged"


def make(net, calib, qmaps=None):
    identity, layers, acts = qmaps or (IDENTITY, LAYERS, ACTS)
    m = bq.preprocess_for_quantize(net.eval(), relu6_to_relu=False, merge_bn=True, equalize_iters=0)
    q = bq.quantize(m, quant_identity_map=identity, compute_layer_map=layers, quant_act_map=acts)
    inp, out = io_quantizers(q)
    for name in (inp, out):  # the model input and the logits on 8-bit grids
        old = q.get_submodule(name)
        setattr(q, name, qnn.QuantIdentity(act_quant=Int8ActPerTensorFloatMSE, return_quant_tensor=old.return_quant_tensor))
    q.eval()
    with torch.no_grad(), calibration_mode(q):
        for b in calib:
            q(b)
    q.eval()
    with torch.no_grad():
        q(calib[0])  # the weights' MSE scales are set on the first quantized forward
    return q, describe(q, inp, out)


def main():
    from bench_qat import peer_args, peer_qat, peer_qat_mobilenet

    torch.manual_seed(0)
    args = peer_args()
    if args.model == "mobilenet":
        how = ("preprocess_for_quantize (BN merged, ReLU6 kept), graph quantize with 4-bit MSE-initialised learned-scale "
               "per-channel weights (Int8WeightPerChannelFloatMSE, narrow range), 8-bit MSE-initialised learned-scale "
               "activations (Int8ActPerTensorFloatMSE / Uint8ActPerTensorFloatMSE), {}, input and logits 8-bit, biases "
               "float, calibration_mode on the 128 calibration crops (batches of 32); distillation QAT on all parameters")
        peer_qat_mobilenet("brevitas", brevitas.__version__, {
            "relu6_max": (how.format("ReLU6 -> QuantReLU with Brevitas' default ReLU6 quantizer (Uint8ActPerTensorFloatMaxInit, "
                                     "max_val 6: learned scale, clips at 6)"),
                          lambda net, calib: make(net, calib, maps(4, 8, relu6_max=True))),
            "relu6_mse": (how.format("ReLU6 -> QuantReLU (ReLU) with the MSE-initialised unsigned quantizer (as the MNIST rows)"),
                          lambda net, calib: make(net, calib, maps(4, 8))),
        }, args)
        return
    peer_qat("brevitas", brevitas.__version__, [
        ("preprocess_for_quantize (BN merged, ReLU6 kept), graph quantize with 4-bit MSE-initialised learned-scale "
         "quantizers (per-channel weights), input and logits 8-bit, calibration_mode on 512 digits; QAT on all parameters",
         make)])


if __name__ == "__main__":
    main()
