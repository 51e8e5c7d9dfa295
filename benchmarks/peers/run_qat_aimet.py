"""AIMET (aimet-torch 2.42) quantization-aware training with range learning on the MNIST-5k network at W4A4, for
``bench_qat.py --part peers`` (run in AIMET's environment).

Its documented QAT path: ``model_preparer.prepare_model`` (functional adds become modules, so they get quantizers),
``fold_all_batch_norms``, ``QuantizationSimModel(quant_scheme=training_range_learning_with_tf_init or
..._with_tf_enhanced_init, default_param_bw=4, default_output_bw=4)``, ``compute_encodings`` on the calibration
digits, then a plain torch training loop on ``sim.model`` (every quantizer's min/max is a trainable parameter).

* Per-channel weights: ``config_file=None`` is AIMET's ``"default"`` alias, ``default_config_per_channel.json``
  (symmetric per-channel weights for Conv/Gemm, asymmetric per-tensor activations, biases unquantized).
* Input and logits on 8-bit grids, as edgequant's W4A4 rows: the model input's quantizer (the first conv's input
  quantizer) and the classifier's output quantizer are set to 8 bits before ``compute_encodings``; every other
  activation quantizer AIMET's config places stays at 4 bits.
* Two range initialisations, one row each: ``tf`` (min/max, the scheme AIMET's QAT-with-range-learning example uses)
  and ``tf_enhanced`` (AIMET's SQNR-based search).

MobileNetV2 (``--model mobilenet``, for ``bench_qat.py --part peers_mobilenet``): torchvision's MobileNetV2 through the
same path at W4A8 (``default_param_bw=4, default_output_bw=8``, so the model input and the logits are 8-bit with every
other activation), ``compute_encodings`` on the 128 calibration crops (batches of 32), then distillation from the float
model (``bench_qat.peer_qat_mobilenet``). Variants: ``tf`` and ``tf_enhanced`` range initialisations.

    python run_qat_aimet.py <inputs.pt> <out.json> [--steps N] [--lr 1e-3] [--threads 2] [--model mobilenet] [--variants tf]
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import aimet_torch  # noqa: E402
import torch  # noqa: E402
from aimet_torch.batch_norm_fold import fold_all_batch_norms  # noqa: E402
from aimet_torch.common.defs import QuantScheme  # noqa: E402
from aimet_torch.model_preparer import prepare_model  # noqa: E402
from aimet_torch.quantsim import QuantizationSimModel  # noqa: E402

INPUT_LAYER, OUTPUT_LAYER = "features.0.0", "classifier"  # the MNIST net's first conv and its logits layer
MOBILENET_IO = ("features.0.0", "classifier.1")  # torchvision's MobileNetV2: the first conv and the logits layer


def describe(model, io=(INPUT_LAYER, OUTPUT_LAYER)) -> str:
    """What the sim quantizes: enabled quantizers by role, bits, symmetry, granularity and the module types they sit on."""
    kinds = Counter()
    trainable = 0
    for name, m in model.named_modules():
        if not hasattr(m, "param_quantizers"):
            continue
        groups = [("input", m.input_quantizers), ("output", m.output_quantizers),
                  ("weight", [q for k, q in m.param_quantizers.items() if k == "weight"])]
        for role, qs in groups:
            for q in qs:
                if q is None:
                    continue
                gran = "per-channel" if q.shape and max(q.shape) > 1 else "per-tensor"
                kind = type(m).__name__
                if getattr(m, "groups", 1) > 1 and m.groups == m.in_channels:
                    kind = "depthwise " + kind  # its ReLU6 is not fused with it by the default config: both quantized
                where = "model input" if (name, role) == (io[0], "input") else (
                    "logits" if (name, role) == (io[1], "output") else f"{role} of {kind}")
                kinds[f"{where}: {q.bitwidth}-bit {'sym' if q.symmetric else 'asym'} {gran}"] += 1
                trainable += sum(p.numel() for p in q.parameters() if p.requires_grad)
        bias = m.param_quantizers["bias"] if "bias" in m.param_quantizers else None
        if bias is not None:
            kinds["bias quantized"] += 1
    parts = [f"{k} x{n}" for k, n in sorted(kinds.items())]
    return "; ".join(parts) + f"; biases float; {trainable} trainable range values; BN folded"


def build(scheme: QuantScheme):
    def make(net, calib):
        m = prepare_model(net.eval())
        fold_all_batch_norms(m, input_shapes=None, dummy_input=calib[0][:1])
        sim = QuantizationSimModel(m, calib[0][:1], quant_scheme=scheme, default_param_bw=4, default_output_bw=4,
                                   config_file=None)
        first, last = sim.model.get_submodule(INPUT_LAYER), sim.model.get_submodule(OUTPUT_LAYER)
        if first.input_quantizers[0] is None or last.output_quantizers[0] is None:
            raise RuntimeError("AIMET placed no quantizer on the model input or the logits")
        first.input_quantizers[0].bitwidth = 8
        last.output_quantizers[0].bitwidth = 8

        def forward(model, _):
            for b in calib:
                model(b)
        sim.compute_encodings(forward, None)
        return sim.model, describe(sim.model)
    return make


def build_mobilenet(scheme: QuantScheme):
    """W4A8 on torchvision's MobileNetV2: AIMET's defaults at 8-bit outputs (the model input and the logits are 8-bit
    with the rest; checked, not set), 4-bit per-channel weights, encodings from the calibration batches."""
    def make(net, calib):
        m = prepare_model(net.eval())
        fold_all_batch_norms(m, input_shapes=None, dummy_input=calib[0][:1])
        sim = QuantizationSimModel(m, calib[0][:1], quant_scheme=scheme, default_param_bw=4, default_output_bw=8,
                                   config_file=None)
        first, last = sim.model.get_submodule(MOBILENET_IO[0]), sim.model.get_submodule(MOBILENET_IO[1])
        if first.input_quantizers[0] is None or last.output_quantizers[0] is None:
            raise RuntimeError("AIMET placed no quantizer on the model input or the logits")
        if first.input_quantizers[0].bitwidth != 8 or last.output_quantizers[0].bitwidth != 8:
            raise RuntimeError("the model input or the logits not on an 8-bit grid")

        def forward(model, _):
            with torch.no_grad():
                for b in calib:
                    model(b)
        sim.compute_encodings(forward, None)
        return sim.model, describe(sim.model, MOBILENET_IO)
    return make


def main():
    from bench_qat import peer_args, peer_qat, peer_qat_mobilenet

    torch.manual_seed(0)
    args = peer_args()
    if args.model == "mobilenet":
        how = ("prepare_model, fold_all_batch_norms, QuantizationSimModel(quant_scheme={}, default_param_bw=4, "
               "default_output_bw=8, config_file=None: AIMET's default per-channel config), compute_encodings on the 128 "
               "calibration crops (batches of 32); distillation QAT on sim.model (weights + biases + min/max)")
        peer_qat_mobilenet("aimet", aimet_torch.__version__, {
            "tf": (how.format("training_range_learning_with_tf_init"),
                   build_mobilenet(QuantScheme.training_range_learning_with_tf_init)),
            "tf_enhanced": (how.format("training_range_learning_with_tf_enhanced_init"),
                            build_mobilenet(QuantScheme.training_range_learning_with_tf_enhanced_init)),
        }, args)
        return
    how = ("prepare_model, fold_all_batch_norms, QuantizationSimModel({}, W4A4, per-channel default config; input and "
           "logits set to 8 bits), compute_encodings on 512 digits; QAT on sim.model (weights + min/max)")
    peer_qat("aimet", aimet_torch.__version__, [
        (how.format("training_range_learning_with_tf_init"), build(QuantScheme.training_range_learning_with_tf_init)),
        (how.format("training_range_learning_with_tf_enhanced_init"),
         build(QuantScheme.training_range_learning_with_tf_enhanced_init)),
    ])


if __name__ == "__main__":
    main()
