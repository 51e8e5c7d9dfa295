"""Deployment proof on real MobileNetV2: ONNX Runtime int8 (QDQ export) vs FP32, and agreement of the
sim, ONNX Runtime's integer kernels and edgequant's integer-only engine.

Prints, measured side by side in one run:
* ORT latency at batch 1 and 32, FP32 vs int8 (uint8 and int8 weight containers), and file sizes;
* agreement of ORT and the integer engine with the sim's integer-exact mode (same target arithmetic):
  identical logits, logits within one output step, top-1, worst step; fidelity to FP32.

Usage: python benchmarks/bench_export.py [--calib 128] [--eval 256] [--repeats 20] [--out FILE.md]
"""
from __future__ import annotations

import os
import tempfile
import time
import warnings

import numpy as np
import onnxruntime as ort
import torch

from edgequant import QuantSim, export_onnx
from edgequant.analysis import fidelity
from edgequant.data import calibration_crops, evaluation_crops
from edgequant.export.integer import IntegerEngine
from edgequant.models import mobilenet_v2_imagenet
from edgequant.ptq import fold_batch_norms
from ort_latency import latencies, ort_quantize_static, timing_parser


def session(path, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def main():
    args = timing_parser(__doc__, 128, 256).parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    model = mobilenet_v2_imagenet().eval()
    folded, _ = fold_batch_norms(model)
    cal, ev = calibration_crops(args.calib), evaluation_crops(args.eval)
    sim = QuantSim(folded, cal[:1], "w8a8")
    sim.calibrate(cal.split(32), progress=False)
    tmp = tempfile.mkdtemp(prefix="edgequant_bench_")
    paths = {}
    with sim.quantization_disabled():
        paths["fp32"] = export_onnx(sim, os.path.join(tmp, "fp32.onnx"))["onnx"]
    paths["int8 (uint8 weights)"] = export_onnx(sim, os.path.join(tmp, "int8_u8w.onnx"))["onnx"]
    paths["int8 (int8 weights)"] = export_onnx(sim, os.path.join(tmp, "int8_s8w.onnx"), weight_dtype="int8")["onnx"]
    sim7 = QuantSim(folded, cal[:1], "w7a8")  # 7-bit weights: exact on u8s8 kernels without VNNI
    sim7.calibrate(cal.split(32), progress=False)
    paths["int8 w7a8 (int8 weights)"] = export_onnx(sim7, os.path.join(tmp, "int8_w7a8.onnx"))["onnx"]
    paths["ORT quantize_static (its own QDQ)"] = ort_quantize_static(  # its setting for x86 without VNNI
        paths["fp32"], [{"x": b.numpy()} for b in cal.split(32)], os.path.join(tmp, "ort_qs.onnx"), reduce_range=True)
    x32 = ev[:32].numpy()
    times = latencies({k: {1: p, 32: p} for k, p in paths.items()}, {1: {"x": x32[:1]}, 32: {"x": x32}},
                      args.threads, args.repeats)
    sessions = {k: session(p, args.threads) for k, p in paths.items()}

    lines = [f"real MobileNetV2 (BN folded, w8a8 per-channel), ONNX Runtime {ort.__version__} CPU, "
             f"{args.threads} threads, load average {os.getloadavg()[0]:.2f}", "",
             "| model | file MB | batch 1 ms | batch 32 ms | speed-up b1 | speed-up b32 |", "|---|---|---|---|---|---|"]
    for k, p in paths.items():
        mb = os.path.getsize(p) / 1e6
        lines.append(f"| {k} | {mb:.2f} | {times[k][1]:.2f} | {times[k][32]:.1f} | {times['fp32'][1] / times[k][1]:.2f}x | "
                     f"{times['fp32'][32] / times[k][32]:.2f}x |")
    lines.append(f"\nsize ratio fp32/int8: {os.path.getsize(paths['fp32']) / os.path.getsize(paths['int8 (uint8 weights)']):.2f}x")

    def batched(fn):
        return torch.cat([fn(b) for b in ev.split(32)])

    def ort_out(k):
        return torch.from_numpy(np.concatenate([sessions[k].run(None, {"x": b.numpy()})[0] for b in ev.split(32)]))

    with torch.no_grad():
        ref_fp = batched(model)
        t0 = time.perf_counter()
        plain = batched(sim)
        t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    with sim.integer_exact("float32"):
        exact32 = batched(sim)
    t_exact = time.perf_counter() - t0
    with sim.integer_exact("fixed_point"):
        exact_fp = batched(sim)
    step = float(sim.quantizers()["classifier.1"].scale)
    rows = [  # (runtime, its output, the sim mode it is compared with, that mode's output)
        ("sim, float fake-quant (default mode)", plain, "sim integer-exact float32", exact32),
        ("ORT int8 (uint8 weights, default export)", ort_out("int8 (uint8 weights)"), "sim integer-exact float32", exact32),
        ("ORT int8 (int8 weights)", ort_out("int8 (int8 weights)"), "sim integer-exact float32", exact32),
        ("integer engine, float32 requant", batched(IntegerEngine(sim, requant="float32")), "sim integer-exact float32", exact32),
        ("integer engine, fixed-point requant", batched(IntegerEngine(sim, requant="fixed_point")), "sim integer-exact fixed_point", exact_fp),
        ("sim integer-exact fixed_point", exact_fp, "sim integer-exact float32", exact32),
    ]
    with sim7.integer_exact("float32"):
        exact7 = batched(sim7)
    rows += [("ORT int8 w7a8 (int8 weights)", ort_out("int8 w7a8 (int8 weights)"), "w7a8 sim integer-exact float32", exact7),
             ("ORT quantize_static (its own QDQ)", ort_out("ORT quantize_static (its own QDQ)"), "sim integer-exact float32", exact32)]
    lines += ["", f"agreement on {args.eval} evaluation crops (one step = {step:.4g}); integer-exact sim took "
              f"{t_exact:.1f} s, the float sim {t_plain:.1f} s", "",
              "| runtime | compared with | identical logits | logits within 1 step | top-1 same | worst steps | top-1 vs FP32 | SQNR vs FP32 dB |",
              "|---|---|---|---|---|---|---|---|"]
    for k, o, refname, ref in rows:
        d = (o - ref).abs() / step
        f = fidelity(ref_fp, o)
        lines.append(f"| {k} | {refname} | {(d < 1e-3).double().mean():.5f} | {(d <= 1.001).double().mean():.5f} | "
                     f"{(o.argmax(1) == ref.argmax(1)).double().mean():.4f} | {d.max():.0f} | {f.top1:.3f} | {f.sqnr_db:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        from edgequant.io.encodings import atomic_write_text

        atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
