"""torchao's PT2E flow: ``torch.export`` -> ``prepare_pt2e`` with ``X86InductorQuantizer`` -> calibrate ->
``convert_pt2e``. Scored as the converted (quantize/dequantize) program; ``torch.compile`` lowering to
real int8 kernels is not timed here (it changes speed, not the numbers it quantizes to).

``X86InductorQuantizer`` ships one static config (per-channel int8 weights, uint8 activations from a
histogram observer). The per-tensor and 4-bit rows replace only its weight spec, the way PT2E's own
quantizers build theirs: a ``QuantizationSpec`` with a per-tensor min-max observer, or with
``quant_min=-8, quant_max=7``. They run as reference programs (Inductor's int8 lowering needs 8-bit
per-channel weights)."""
from __future__ import annotations

import copy
import dataclasses

import torch
import torchao
from common import Data, Recorder, main_args, pair
from torchao.quantization.pt2e import MinMaxObserver, PerChannelMinMaxObserver
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq


def config(per_channel: bool = True, bits: int = 8):
    """X86InductorQuantizer's default static config with its weight spec changed to ``per_channel``/``bits``."""
    cfg = xiq.get_default_x86_inductor_quantization_config()
    if per_channel and bits == 8:
        return cfg
    w = cfg.weight
    extra = {"eps": 2**-12}
    w = dataclasses.replace(
        w, quant_min=-(2 ** (bits - 1)), quant_max=2 ** (bits - 1) - 1,
        qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric,
        ch_axis=0 if per_channel else None,
        observer_or_fake_quant_ctr=(PerChannelMinMaxObserver if per_channel else MinMaxObserver).with_args(**extra))
    return dataclasses.replace(cfg, weight=w)


def quantize(model, batches, cfg):
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(copy.deepcopy(model).eval(), (batches[0],), dynamic_shapes=({0: batch},)).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(cfg)
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

    todo = {
        "w8a8_pc": ("PT2E X86InductorQuantizer defaults (per-channel weights)", config()),
        "w8a8_pt": ("X86InductorQuantizer config, per-tensor min-max weights", config(per_channel=False)),
        "w4a8_nearest": ("X86InductorQuantizer config, 4-bit per-channel min-max weights", config(bits=4)),
        "best": ("PT2E X86InductorQuantizer defaults (per-channel weights)", config()),
    }
    for row in args.rows:
        if row in todo:
            method, cfg = todo[row]
            rec.row(row, method, pair(data, model, mnist, lambda m, b, cfg=cfg: quantize(m, b, cfg)))


if __name__ == "__main__":
    main()
