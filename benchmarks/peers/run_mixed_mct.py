"""Sony model-compression-toolkit (MCT 2.6.1) mixed-precision PTQ on the BN-folded MobileNetV2, under BOPs targets.

Entry points, all documented: ``mct.ptq.pytorch_post_training_quantization`` with a
``target_resource_utilization`` (``mct.core.ResourceUtilization(bops=...)``: MCT's bit operations, MACs x
weight bits x input-activation bits, the same definition as edgequant's) and a ``CoreConfig`` whose
``mixed_precision_config`` is ``mct.core.MixedPrecisionQuantizationConfig(num_of_images=32)`` (32 images,
the scoring set of edgequant's search; MCT's own sensitivity metric: distances at interest points,
solved as an integer program); ``mct.core.pytorch_resource_utilization_data`` gives the BOPs of the
all-high configuration, and the target is that times the share.

Candidates come from a target platform (TPC) built the way MCT's docs ask for other configurations:
the IMX500 v1.0 TPC's ``get_op_quantization_configs`` / ``generate_tpc`` with the mixed-precision list
of the convs and the linear replaced by ``OpQuantizationConfig`` for kernel 8 or 4 bits x output activation
16 or 8 bits (W8A16, W8A8, W4A16, W4A8), all accepting 8- or 16-bit inputs -- with a BOPs target MCT
requires every layer's candidates to be this full product ("composite"; the pair W8A16 / W4A8 alone fails
with "The node features_1_conv_1 cannot be split as it has non-composite candidates") -- and
the default options (ReLU6, add, pooling, the input) made two as well: activation 16 or 8 bits. The
closest MCT comes to edgequant's pair: in MCT an activation candidate belongs to the op that *produces*
the tensor, so a conv's weight bits and its input's bits are chosen separately (MCT's weights and
activation mixed precision together, tied only through the BOPs budget). Quantization methods are the
TPC's (symmetric per-channel kernels, power-of-two activations).

Held-out metrics are ``edgequant.metrics.fidelity`` on the 64 evaluation crops, for the quantized model MCT
returns. Bit operations are counted here on that model, not taken from MCT: forward hooks with one crop
give every conv/linear (``PytorchQuantizationWrapper``) its MACs (output elements x weight elements per
output channel, ``edgequant.sim.cost``'s formula), its kernel quantizer's bits and the bits of the
activation holder whose output it consumes (else the last holder run before it). MCT's own count differs:
it warns "Node add_1 has multiple outgoing edges, which is not supported with mixed-precision search under
bit-operations constraint" for every tensor that feeds a residual branch, so its chosen mix can land above
the share by this count.

    python run_mixed_mct.py .peers/mixed --targets 0.5,0.75
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

import torch
from mixed_common import load, runner_args

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import model_compression_toolkit as mct
from torch import nn

BATCH = 16


def w8a16_w4a8_tpc():
    """IMX500 v1.0's TPC with the candidates W8A16 / W4A8 (see the module docstring)."""
    import model_compression_toolkit.target_platform_capabilities.schema.mct_current_schema as schema
    from model_compression_toolkit.target_platform_capabilities.constants import (
        KERNEL_ATTR,
        WEIGHTS_N_BITS,
    )
    from model_compression_toolkit.target_platform_capabilities.tpc_models.imx500_tpc.v1_0.tpc import (
        generate_tpc,
        get_op_quantization_configs,
    )

    base, _, default = get_op_quantization_configs()
    both = {"supported_input_activation_n_bits": (8, 16)}
    w8a16 = base.clone_and_edit(activation_n_bits=16, **both)
    w4a8 = base.clone_and_edit(attr_to_edit={KERNEL_ATTR: {WEIGHTS_N_BITS: 4}}, activation_n_bits=8, **both)
    w8a8, w4a16 = w8a16.clone_and_edit(activation_n_bits=8), w4a8.clone_and_edit(activation_n_bits=16)
    a16 = default.clone_and_edit(activation_n_bits=16, **both)
    a8 = default.clone_and_edit(activation_n_bits=8, **both)
    tpc = generate_tpc(default_config=a16, base_config=w8a16, mixed_precision_cfg_list=[w8a16, w8a8, w4a16, w4a8], name="w8a16_w4a8")
    qco = schema.QuantizationConfigOptions(quantization_configurations=(a16, a8), base_config=a16)
    return tpc.model_copy(update={"default_qco": qco})


@torch.no_grad()
def bit_ops(model: nn.Module, x: torch.Tensor) -> tuple[int, list[str], dict]:
    from mct_quantizers import (
        PytorchActivationQuantizationHolder,
        PytorchQuantizationWrapper,
    )

    produced, layers, unknown, hooks, last, bits = {}, [], [], [], [None], {}

    def hold(mod, inp, out):
        nb = int(mod.activation_holder_quantizer.num_bits)
        produced[out.data_ptr()] = (nb, out)  # the tensor is kept: no reuse of its address
        last[0] = nb

    def lhook(name):
        def h(mod, inp, out):
            layer = mod.layer if isinstance(mod, PytorchQuantizationWrapper) else mod
            if not isinstance(layer, (nn.Conv2d, nn.Linear)):
                return
            if inp[0].data_ptr() in produced:
                ab = produced[inp[0].data_ptr()][0]
            else:
                unknown.append(name)
                ab = last[0] if last[0] is not None else 32
            wq = getattr(mod, "weights_quantizers", {}).get("weight")
            wb = int(wq.num_bits) if wq is not None else 32
            macs = out[0].numel() * layer.weight[0].numel()
            layers.append(macs * wb * ab)
            bits[name] = (wb, ab)
        return h

    for name, m in model.named_modules():
        if isinstance(m, PytorchActivationQuantizationHolder):
            hooks.append(m.register_forward_hook(hold))
        elif isinstance(m, PytorchQuantizationWrapper):
            hooks.append(m.register_forward_hook(lhook(name)))
    try:
        model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return int(sum(layers)), unknown, bits


def main():
    from edgequant.metrics import fidelity

    folder, targets, out, save = runner_args("mct", mct.__version__)
    try:
        model, cal, ev, ref, _ = load(folder)
        batches = list(cal.split(BATCH))

        def representative_data_gen():
            for b in batches:
                yield [b]

        tpc = w8a16_w4a8_tpc()
        core = lambda: mct.core.CoreConfig(
            mixed_precision_config=mct.core.MixedPrecisionQuantizationConfig(num_of_images=32))
        t0 = time.perf_counter()
        ru = mct.core.pytorch_resource_utilization_data(model, representative_data_gen, core_config=core(),
                                                        target_platform_capabilities=tpc)
        ru_s = time.perf_counter() - t0
        out["mct_max_bops"], out["ru_seconds"] = float(ru.bops), ru_s
        print(f"[mct] resource utilization data: {ru}", flush=True)
        save()
        for t in targets:
            row = {"target": t, "load_average": os.getloadavg()[0]}
            try:
                t0 = time.perf_counter()
                qmodel, _ = mct.ptq.pytorch_post_training_quantization(
                    model, representative_data_gen, target_resource_utilization=mct.core.ResourceUtilization(bops=t * ru.bops),
                    core_config=core(), target_platform_capabilities=tpc)
                row["seconds"] = time.perf_counter() - t0
                qmodel.eval()
                row["bops"], unknown, bits = bit_ops(qmodel, cal)
                with torch.no_grad():
                    f = fidelity(ref, torch.cat([qmodel(b) for b in ev.split(32)]))
                n4 = sum(w == 4 for w, _ in bits.values())
                n8in = sum(a == 8 for _, a in bits.values())
                row.update(sqnr_db=f.sqnr_db, top1=f.top1, layer_bits=bits)
                row["note"] = (f"{n4} of {len(bits)} conv/linear kernels at 4 bits, {n8in} with 8-bit inputs; MCT's BOPs target "
                               f"{t * ru.bops / 1e9:.2f} G of its all-high {ru.bops / 1e9:.2f} G; search s = the whole PTQ "
                               f"call (+{ru_s:.0f} s once for the resource data); MCT warns that nodes with several consumers "
                               "(the residual branches) are not supported under a BOPs constraint, hence its count differs"
                               + (f"; input bits of {unknown} from the last holder run before it" if unknown else ""))
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            out["rows"].append(row)
            print("[mct]", {k: v for k, v in row.items() if k != "layer_bits"}, flush=True)
            save()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        out["rows"] = out["rows"] or [{"target": t, "error": f"{type(e).__name__}: {e}"} for t in targets]
        save()


if __name__ == "__main__":
    main()
