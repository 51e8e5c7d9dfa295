"""Brevitas 0.13 post-training quantization, through the entry points of its ImageNet PTQ example
(``brevitas_examples.imagenet_classification.ptq``): ``preprocess_for_quantize`` (BN merge, ReLU6 ->
ReLU, optional graph equalization), ``quantize_model`` (fx backend), ``calibrate`` and
``apply_bias_correction``."""
from __future__ import annotations

import copy

import brevitas
import torch
from brevitas.graph.quantize import preprocess_for_quantize
from brevitas_examples.imagenet_classification.ptq.ptq_common import apply_bias_correction, calibrate, quantize_model
from common import Data, Recorder, main_args, timed


def quantize(model, batches, granularity, weight_bits=8, equalize_iters=0, bias_correction=False):
    m = preprocess_for_quantize(copy.deepcopy(model).eval(), equalize_iters=equalize_iters, merge_bn=True)
    q = quantize_model(m, backend="fx", weight_bit_width=weight_bits, act_bit_width=8, bias_bit_width=32,
                       weight_quant_granularity=granularity, act_quant_percentile=99.999, act_quant_type="asym",
                       scale_factor_type="float_scale", quant_format="int")
    loader = [(b, None) for b in batches]  # its helpers iterate (images, target)
    calibrate(loader, q)
    if bias_correction:
        apply_bias_correction(loader, q)
    return q.eval()


def main():
    args = main_args()
    data = Data(args.data)
    rec = Recorder("brevitas", brevitas.__version__, args.out, data)
    model, mnist = data.mobilenet(), data.mnist_net()

    def pair(**kw):
        def run():
            qm, t = timed(lambda: quantize(model, data.cal_batches(), **kw))
            mq, mt = timed(lambda: quantize(mnist, data.mnist_cal_batches(), **kw))
            return dict(seconds=t, imagenet=qm, fp32=model, mnist=mq, mnist_seconds=mt)
        return run

    todo = {
        "w8a8_pc": ("per-channel weights + bias correction", pair(granularity="per_channel", bias_correction=True)),
        "w8a8_pt": ("per-tensor weights", pair(granularity="per_tensor")),
        "w8a8_pt_cle": ("graph equalization (20 iterations) + bias correction, per-tensor",
                        pair(granularity="per_tensor", equalize_iters=20, bias_correction=True)),
        "w4a8_nearest": ("4-bit per-channel weights", pair(granularity="per_channel", weight_bits=4)),
    }
    with torch.no_grad():
        for row in args.rows:
            if row in todo:
                method, run = todo[row]
                rec.row(row, method, run)


if __name__ == "__main__":
    main()
