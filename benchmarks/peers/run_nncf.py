"""NNCF's post-training quantization (``nncf.quantize``) of the same float model."""
from __future__ import annotations

import copy

import nncf
import torch
from common import Data, Recorder, main_args
from common import pair as pair_of
from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters


def main():
    args = main_args()
    data = Data(args.data)
    rec = Recorder("nncf", nncf.__version__, args.out, data)
    model, mnist = data.mobilenet(), data.mnist_net()

    def q(m, batches, **kw):
        # as NNCF's documentation feeds it: a DataLoader of single samples, subset_size counted in samples
        # (statistics are reduced per dataset item, so items of 32 samples would change its MEAN_MINMAX ranges)
        x = torch.cat(batches)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=1)
        dataset = nncf.Dataset(loader, lambda item: item[0])
        return nncf.quantize(copy.deepcopy(m), dataset, subset_size=len(x), **kw).eval()

    def pair(**kw):
        return pair_of(data, model, mnist, lambda m, b: q(m, b, **kw))

    per_tensor = QuantizationParameters(per_channel=False)
    todo = {
        "w8a8_pc": [("nncf.quantize defaults (per-channel weights, fast bias correction)", pair())],
        "w8a8_pt": [("per-tensor weights, bias correction off",
                     pair(advanced_parameters=AdvancedQuantizationParameters(weights_quantization_params=per_tensor,
                                                                             disable_bias_correction=True)))],
        "w8a8_pt_cle": [("per-tensor weights + fast bias correction (NNCF has no CLE for CNNs)",
                         pair(advanced_parameters=AdvancedQuantizationParameters(weights_quantization_params=per_tensor)))],
        # NNCF's hardware configs allow only 8-bit quantizers in nncf.quantize (its 4-bit path,
        # compress_weights, is weight-only); the row records the error it raises
        "w4a8_nearest": [("4-bit weights (weights_quantization_params num_bits=4)",
                          pair(advanced_parameters=AdvancedQuantizationParameters(
                              weights_quantization_params=QuantizationParameters(num_bits=4))))],
        "best": [("nncf.quantize defaults", pair())],
    }
    for row in args.rows:
        for method, run in todo.get(row, []):
            rec.row(row, method, run)


if __name__ == "__main__":
    main()
