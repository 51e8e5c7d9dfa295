"""AIMET (aimet-torch 2.42): QuantizationSimModel with tf_enhanced ranges on the BN-folded model,
cross-layer equalization, and AdaRound.

* ``config_file=None`` gives per-channel weights; per-tensor needs AIMET's ``default_config.json``.
* AIMET's CLE skips conv-ReLU6-conv pairs, so (as its documentation asks) ReLU6 is replaced by ReLU
  first, which changes the float model; aimet-torch 2.42 ships no bias correction.
* AdaRound's default is 15,000 iterations per layer below 8 bits (about 10 hours here): it runs the
  given number (default 200, edgequant's) and the row reports seconds per iteration and the time
  extrapolated to the default.
"""
from __future__ import annotations

import copy
import os
import time

import aimet_torch
import torch
from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters
from aimet_torch.batch_norm_fold import fold_all_batch_norms
from aimet_torch.common.defs import QuantScheme
from aimet_torch.cross_layer_equalization import equalize_model
from aimet_torch.quantsim import QuantizationSimModel
from common import Data, Recorder, main_args, pair
from torch import nn

PER_TENSOR_CONFIG = os.path.join(os.path.dirname(aimet_torch.__file__), "common", "quantsim_config", "default_config.json")
DEFAULT_ITERATIONS_BELOW_8_BITS = 15000


def folded(model, batches):
    m = copy.deepcopy(model).eval()
    fold_all_batch_norms(m, input_shapes=None, dummy_input=batches[0][:1])
    return m


def relu6_to_relu(m):
    for name, child in m.named_children():
        if isinstance(child, nn.ReLU6):
            setattr(m, name, nn.ReLU(inplace=child.inplace))
        else:
            relu6_to_relu(child)
    return m


def sim_of(m, batches, param_bw=8, config=None, freeze=None):
    sim = QuantizationSimModel(m, dummy_input=batches[0][:1], quant_scheme=QuantScheme.post_training_tf_enhanced,
                               default_param_bw=param_bw, default_output_bw=8, config_file=config)
    if freeze is not None:
        sim.load_and_freeze_encodings(freeze, ignore_when_quantizer_disabled=True)

    def forward(model, _):
        with torch.no_grad():
            for b in batches:
                model(b)
    sim.compute_encodings(forward, None)
    return sim.model


def main():
    args = main_args()
    data = Data(args.data)
    rec = Recorder("aimet", aimet_torch.__version__, args.out, data)
    model, mnist = data.mobilenet(), data.mnist_net()
    its = args.adaround_iterations or 200

    def cle(m, batches):
        m = relu6_to_relu(copy.deepcopy(m).eval())
        equalize_model(m, dummy_input=batches[0][:1])  # folds BN, scales, absorbs high biases
        return m

    spent = []

    def ada(m, batches, out):
        fm = folded(m, batches)
        params = AdaroundParameters(batches, num_batches=len(batches), default_num_iterations=its,
                                    forward_fn=lambda mm, x: mm(x))
        t0 = time.perf_counter()
        am = Adaround.apply_adaround(fm, batches[0][:1], params, path=str(out), filename_prefix="adaround",
                                     default_param_bw=4, default_quant_scheme=QuantScheme.post_training_tf_enhanced)
        spent.append(time.perf_counter() - t0)
        return sim_of(am, batches, 4, freeze=os.path.join(out, "adaround.encodings"))

    def ada_note(t):
        per_it = spent[0] / its  # activation caching included, so the extrapolation is an upper bound
        return (f"AdaRound {its} it/layer took {spent[0]:.0f} s ({per_it:.2f} s per iteration over all layers, activation "
                f"caching included); AIMET's default {DEFAULT_ITERATIONS_BELOW_8_BITS} it/layer extrapolates to at most "
                f"{per_it * DEFAULT_ITERATIONS_BELOW_8_BITS / 3600:.1f} h")

    row = lambda make, note=None: pair(data, model, mnist, make, note)  # noqa: E731
    ada_dir = rec.out / "adaround"
    ada_dir.mkdir(parents=True, exist_ok=True)
    todo = {
        "w8a8_pc": ("QuantSim tf_enhanced, per-channel (config_file=None), BN folded",
                    row(lambda m, b: sim_of(folded(m, b), b))),
        "w8a8_pt": ("QuantSim tf_enhanced, per-tensor (default_config.json), BN folded",
                    row(lambda m, b: sim_of(folded(m, b), b, config=PER_TENSOR_CONFIG))),
        "w8a8_pt_cle": ("ReLU6->ReLU, equalize_model (CLE + high-bias absorption), per-tensor; no bias correction in 2.42",
                        row(lambda m, b: sim_of(cle(m, b), b, config=PER_TENSOR_CONFIG))),
        "w4a8_nearest": ("QuantSim tf_enhanced, 4-bit per-channel weights", row(lambda m, b: sim_of(folded(m, b), b, 4))),
        "w4a8_adaround": (f"AdaRound {its} it/layer (default {DEFAULT_ITERATIONS_BELOW_8_BITS}), tf_enhanced",
                          row(lambda m, b: ada(m, b, ada_dir), ada_note)),
    }
    for r in args.rows:
        if r in todo:
            method, run = todo[r]
            rec.row(r, method, run)


if __name__ == "__main__":
    main()
