"""Speed of what is deployed: ONNX Runtime latency of edgequant's int8 export against the FP32 model and
against ONNX Runtime's own ``quantize_static`` model of the same network, side by side in one run.

Per model (BatchNorm folded; MobileNetV2 with its real ImageNet weights, the others with random
weights: latency does not depend on the values), at batch 1 and 32, 2 threads, in a fresh process:
FP32 (edgequant's export with its quantizers off), edgequant ``w8a8`` (uint8 weight containers, exact
on every x86 CPU), edgequant ``w7a8`` (int8 weights, exact on ORT's fast u8s8 kernels), for models
with ReLU6 also ``w7a8`` after activation equalization (the form ``edgequant.quantize``'s default recipe
deploys: per-channel clamps before the depthwise convs), for models with SiLU also ``w7a8`` after
``edgequant.nn.split_silu`` (SiLU as integer sigmoid and multiply), and ORT's
``quantize_static`` (uint8 activations, int8 per-channel weights, ``reduce_range``: its setting for
CPUs without VNNI). Transformers are measured in ``bench_transformers.py``.

Usage: python benchmarks/bench_latency.py [--models mobilenet_v2,resnet18,efficientnet_b0,mobilenet_v3_large] [--repeats 20]
       [--out benchmarks/results/latency.md]
"""
from __future__ import annotations

import os
import platform
import tempfile
import warnings

import onnxruntime as ort
import torch

from edgequant import QuantSim, export_onnx
from edgequant.data import calibration_crops
from edgequant.models import mobilenet_v2_imagenet
from edgequant.nn import split_silu
from edgequant.ptq import equalize_activations, fold_batch_norms
from ort_latency import emit, latencies, ort_quantize_static, timing_parser


def _model(name: str) -> torch.nn.Module:
    if name == "mobilenet_v2":
        return mobilenet_v2_imagenet()
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


def export_all(name: str, cal: torch.Tensor, tmp: str) -> dict[str, str]:
    folded, _ = fold_batch_norms(_model(name))
    paths = {}
    sim = QuantSim(folded, cal[:1], "w8a8")
    sim.calibrate(cal.split(8), progress=False)
    with sim.quantization_disabled():
        paths["FP32"] = export_onnx(sim, os.path.join(tmp, f"{name}_fp32.onnx"))["onnx"]
    paths["edgequant w8a8"] = export_onnx(sim, os.path.join(tmp, f"{name}_w8a8.onnx"))["onnx"]
    sim7 = QuantSim(folded, cal[:1], "w7a8")
    sim7.calibrate(cal.split(8), progress=False)
    paths["edgequant w7a8"] = export_onnx(sim7, os.path.join(tmp, f"{name}_w7a8.onnx"))["onnx"]
    if any(isinstance(m, torch.nn.ReLU6) for m in folded.modules()):
        # what edgequant.quantize's default recipe deploys: activation equalization turns the ReLU6 before each
        # depthwise conv into a per-channel clamp (exported as Max/Min on the quantized integers)
        eq, _ = equalize_activations(folded, cal.split(8))
        sim_eq = QuantSim(eq, cal[:1], "w7a8")
        sim_eq.calibrate(cal.split(8), progress=False)
        paths["edgequant w7a8 + act_eq"] = export_onnx(sim_eq, os.path.join(tmp, f"{name}_w7a8_acteq.onnx"))["onnx"]
    if any(isinstance(m, torch.nn.SiLU) for m in folded.modules()):  # SiLU as QLinearSigmoid + QLinearMul
        sim_s = QuantSim(split_silu(folded), cal[:1], "w7a8")
        sim_s.calibrate(cal.split(8), progress=False)
        paths["edgequant w7a8 + split_silu"] = export_onnx(sim_s, os.path.join(tmp, f"{name}_w7a8_split.onnx"))["onnx"]
    paths["ORT quantize_static"] = ort_quantize_static(paths["FP32"], [{"x": b.numpy()} for b in cal.split(32)],
                                                       os.path.join(tmp, f"{name}_ort.onnx"), reduce_range=True)
    return paths


def main():
    ap = timing_parser(__doc__, 32, 32)
    ap.add_argument("--models", default="mobilenet_v2,resnet18,efficientnet_b0,mobilenet_v3_large")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    cal = calibration_crops(args.calib)
    x32 = calibration_crops(32, seed=7).numpy()
    tmp = tempfile.mkdtemp(prefix="edgequant_bench_lat_")
    lines = [f"ONNX Runtime {ort.__version__} CPU ({platform.processor() or platform.machine()}), {args.threads} threads, "
             f"median of {args.repeats} interleaved runs in a fresh process, load average {os.getloadavg()[0]:.2f}", "",
             "| model | export | batch 1 ms | batch 32 ms | vs FP32 b1 | vs FP32 b32 | vs ORT quantize_static b1 | b32 |",
             "|---|---|---|---|---|---|---|---|"]
    for name in args.models.split(","):
        paths = export_all(name, cal, tmp)
        t = latencies({k: {1: p, 32: p} for k, p in paths.items()}, {1: {"x": x32[:1]}, 32: {"x": x32}},
                      args.threads, args.repeats)
        for k in paths:
            lines.append(f"| {name} | {k} | {t[k][1]:.2f} | {t[k][32]:.1f} | {t['FP32'][1] / t[k][1]:.2f}x | "
                         f"{t['FP32'][32] / t[k][32]:.2f}x | {t['ORT quantize_static'][1] / t[k][1]:.2f}x | "
                         f"{t['ORT quantize_static'][32] / t[k][32]:.2f}x |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
