"""Brevitas 0.13 post-training quantization, through the entry points of its ImageNet PTQ example
(``brevitas_examples.imagenet_classification.ptq``): ``preprocess_for_quantize`` (BN merge, ReLU6 ->
ReLU, optional graph equalization), ``quantize_model``, ``calibrate``, ``apply_bias_correction`` and
``apply_learned_round`` (AdaRound-style learned rounding, as ``ptq_evaluate --learned-round``).

Learned round needs Brevitas' ``layerwise`` backend (quantized layer inputs and weights; the ``fx``
backend of the other rows also quantizes outputs and adds). Its first and last layers default to 8
bits there; they are set to 4 here, as for every other peer in the row. Its loss and learning rate are
the example's defaults; iterations (200) and batch size (32) are the other AdaRound rows' (the
example's defaults are 1,000 iterations at batch size 1). The example hard-codes float16 autocast, made
for GPUs; on this CPU it made the first layers take 2-4 minutes each, so it is turned off (float32, about
75 s per early layer), the one change to its training arguments. Its per-layer losses grow during
training in both precisions (e.g. 0.05 -> 7.9 on the first layer): that is its result at its defaults."""
from __future__ import annotations

import copy
import time
from argparse import Namespace

import brevitas
import torch
from brevitas.graph.quantize import preprocess_for_quantize
from brevitas_examples.imagenet_classification.ptq import learned_round_utils
from brevitas_examples.imagenet_classification.ptq.ptq_common import apply_bias_correction, calibrate, quantize_model
from common import Data, Recorder, main_args, pair


def _float32_training_args(args):
    config = _example_training_args(args)
    config.training_args.use_amp = False
    return config


_example_training_args = learned_round_utils.parse_args_to_dataclass
learned_round_utils.parse_args_to_dataclass = _float32_training_args  # apply_learned_round looks it up here


def quantize(model, batches, granularity, weight_bits=8, equalize_iters=0, bias_correction=False, backend="fx",
             learned_round_iters=0, spent=None):
    m = preprocess_for_quantize(copy.deepcopy(model).eval(), equalize_iters=equalize_iters, merge_bn=True)
    q = quantize_model(m, backend=backend, weight_bit_width=weight_bits, act_bit_width=8, bias_bit_width=32,
                       weight_quant_granularity=granularity, act_quant_percentile=99.999, act_quant_type="asym",
                       scale_factor_type="float_scale", quant_format="int", layerwise_first_last_bit_width=weight_bits)
    loader = [(b, None) for b in batches]  # its helpers iterate (images, target)
    with torch.no_grad():
        calibrate(loader, q)
    if learned_round_iters:
        args = Namespace(learned_round="hard_sigmoid", learned_round_mode="layerwise", learned_round_loss="regularised_mse",
                         learned_round_iters=learned_round_iters, learned_round_lr_scheduler=None,
                         learned_round_lr=1e-3, learned_round_batch_size=32)
        t0 = time.perf_counter()
        learned_round_utils.apply_learned_round(model=q, calibration_loader=loader, args=args)
        if spent is not None:
            spent.append(time.perf_counter() - t0)
    if bias_correction:
        with torch.no_grad():
            apply_bias_correction(loader, q)
    return q.eval()


def main():
    args = main_args()
    data = Data(args.data)
    rec = Recorder("brevitas", brevitas.__version__, args.out, data)
    model, mnist = data.mobilenet(), data.mnist_net()
    its = args.adaround_iterations or 200
    spent = []

    def row(note=None, **kw):
        return pair(data, model, mnist, lambda m, b: quantize(m, b, **kw), note)

    def lr_note(t):
        return f"learned round {its} it/layer took {spent[0]:.0f} s of the {t:.0f} s" if spent else ""

    todo = {
        "w8a8_pc": ("per-channel weights + bias correction", row(granularity="per_channel", bias_correction=True)),
        "w8a8_pt": ("per-tensor weights", row(granularity="per_tensor")),
        "w8a8_pt_cle": ("graph equalization (20 iterations) + bias correction, per-tensor",
                        row(granularity="per_tensor", equalize_iters=20, bias_correction=True)),
        "w4a8_nearest": ("4-bit per-channel weights", row(granularity="per_channel", weight_bits=4)),
        "w4a8_adaround": (f"learned round (hard sigmoid, regularised MSE), {its} it/layer, batch 32, layerwise backend",
                          row(lr_note, granularity="per_channel", weight_bits=4, backend="layerwise",
                              learned_round_iters=its, spent=spent)),
    }
    for r in args.rows:
        if r in todo:
            method, run = todo[r]
            rec.row(r, method, run)


if __name__ == "__main__":
    main()
