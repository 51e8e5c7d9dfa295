"""torchao's PT2E flow: ``torch.export`` -> ``prepare_pt2e`` with ``X86InductorQuantizer`` -> calibrate ->
``convert_pt2e``. Scored as the converted (quantize/dequantize) program; ``torch.compile`` lowering to
real int8 kernels is not timed here (it changes speed, not the numbers it quantizes to)."""
from __future__ import annotations

import copy

import torch
import torchao
from common import Data, Recorder, main_args, timed
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq


def quantize(model, batches):
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(copy.deepcopy(model).eval(), (batches[0],), dynamic_shapes=({0: batch},)).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(ep, quantizer)
    with torch.no_grad():
        for b in batches:
            prepared(b)
    return convert_pt2e(prepared)


def main():
    args = main_args()
    data = Data(args.data)
    rec = Recorder("torchao", torchao.__version__, args.out, data)
    model, mnist = data.mobilenet(), data.mnist_net()

    def run():
        qm, t = timed(lambda: quantize(model, data.cal_batches()))
        mq, mt = timed(lambda: quantize(mnist, data.mnist_cal_batches()))
        return dict(seconds=t, imagenet=qm, fp32=model, mnist=mq, mnist_seconds=mt)

    for row in args.rows:
        if row in ("w8a8_pc", "best"):
            rec.row(row, "PT2E X86InductorQuantizer defaults (per-channel weights)", run)


if __name__ == "__main__":
    main()
