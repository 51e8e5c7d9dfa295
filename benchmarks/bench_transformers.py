"""all-MiniLM-L6-v2 (real weights) quantized, exported and run in ONNX Runtime, on real sentences.

Per row, on two splits of the shipped sentences (seeded shuffles; calibration and evaluation disjoint):
* sentence-embedding cosine to FP32 (mean over evaluation sentences) and nearest-neighbour agreement
  (for each evaluation sentence, its nearest other sentence under FP32 and under the quantized model);
* for exported rows, the same in ONNX Runtime;
* ORT latency (fresh process, 2 threads, sequence length 64) at batch 1 and 32: FP32 ONNX, edgequant's
  int8 export and ONNX Runtime's own ``quantize_static`` of the same FP32 model.

Usage: python benchmarks/bench_transformers.py [--calib 128] [--eval 128] [--repeats 20] [--out FILE.md]
"""
from __future__ import annotations

import os
import tempfile
import time
import warnings

import onnxruntime as ort
import torch

from edgequant import QuantSim, export_onnx
from edgequant.config.spec import QuantConfig, QuantSpec
from edgequant.core.granularity import PerBlock, PerChannel
from edgequant.data import sentence_split
from edgequant.models import minilm_l6_v2, tokenize
from edgequant.ptq import smooth_linear_inputs
from ort_latency import emit, latencies, ort_quantize_static, timing_parser

SEQ = 64
SMOOTHED = "w8a8_transformer + smooth_linear_inputs"
ROWS = {
    "w8a8 (CNN preset)": "w8a8",
    "w8a8_transformer": "w8a8_transformer",
    SMOOTHED: "w8a8_transformer",
    "w8a16": "w8a16",
    "weight-only int4 (per channel, MSE)": QuantConfig(
        weight=QuantSpec(bits=4, symmetric=True, signed=True, granularity=PerChannel(), range_method="mse"), activation=None),
    "weight-only int4 (blocks of 32, min-max)": QuantConfig(
        weight=QuantSpec(bits=4, symmetric=True, signed=True, granularity=PerBlock(32, axis=1), range_method="minmax"),
        activation=None),
}
EXPORTED = ("w8a8_transformer", SMOOTHED, "w8a16")
INT8_ROW = f"edgequant {SMOOTHED}, int8 weight containers (`weight_dtype=\"int8\"`: exact where the CPU has VNNI)"


def _cpu() -> str:
    """The CPU's model name and whether it has VNNI (int8 dot products: u8s8 kernels do not saturate)."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown"
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "unknown")
    return f"{name}, {'with' if 'vnni' in info else 'without'} VNNI"


def batches(ids, mask, size=16):
    return [(ids[i:i + size], mask[i:i + size]) for i in range(0, len(ids), size)]


def embed(fn, data):
    with torch.no_grad():
        return torch.cat([fn(*b) for b in data])


def fidelity(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """(mean cosine, nearest-neighbour agreement) of embeddings ``got`` against ``ref``."""
    cos = torch.nn.functional.cosine_similarity(ref, got).mean().item()

    def nn_index(e):
        e = torch.nn.functional.normalize(e, dim=-1)
        s = e @ e.T
        s.fill_diagonal_(-2)
        return s.argmax(1)
    return cos, (nn_index(ref) == nn_index(got)).float().mean().item()


def _feed(batch) -> dict:
    """ONNX Runtime's inputs for one ``(input_ids, attention_mask)`` batch."""
    return {"input_ids": batch[0].numpy(), "attention_mask": batch[1].numpy()}


def ort_embed(path, data):
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.cat([torch.from_numpy(s.run(None, _feed(b))[0]) for b in data])


def run_split(enc, tok, seed, n_calib, n_eval, tmp):
    cal_s, ev_s = sentence_split(n_calib, n_eval, seed=seed)
    cal, ev = batches(*tokenize(tok, cal_s, SEQ)), batches(*tokenize(tok, ev_s, SEQ))
    ref = embed(enc, ev)
    rows, sims = {}, {}
    for label, cfg in ROWS.items():
        t = time.perf_counter()
        model = smooth_linear_inputs(enc, cal)[0] if label == SMOOTHED else enc
        sim = QuantSim(model, cal[0], cfg)
        sim.calibrate(cal, progress=False)
        rows[label] = {"sim": fidelity(ref, embed(sim, ev)), "s": time.perf_counter() - t, "mode": sim.capture_mode}
        sims[label] = sim
    paths = {}
    for label in EXPORTED:
        p = export_onnx(sims[label], os.path.join(tmp, f"{label}_{seed}.onnx"), dynamic_batch=False)["onnx"]
        rows[label]["ort"] = fidelity(ref, ort_embed(p, ev))
        paths[label] = p
    with sims["w8a8_transformer"].quantization_disabled():
        fp32 = export_onnx(sims["w8a8_transformer"], os.path.join(tmp, f"fp32_{seed}.onnx"), dynamic_batch=False)["onnx"]
    rows["FP32 ONNX (edgequant export, quantizers off)"] = {"ort": fidelity(ref, ort_embed(fp32, ev))}
    qs = ort_quantize_static(fp32, [_feed(b) for b in cal], os.path.join(tmp, f"ort_qs_{seed}.onnx"))
    rows["ONNX Runtime quantize_static (QDQ, per-channel, MinMax)"] = {"ort": fidelity(ref, ort_embed(qs, ev))}
    return rows, sims


def latency_table(tok, sims, tmp, threads, repeats):
    ids, mask = tokenize(tok, sentence_split(32, 1, seed=0)[0], SEQ)
    paths = {"FP32": {}, "edgequant w8a8_transformer": {}, f"edgequant {SMOOTHED}": {}, INT8_ROW: {},
             "ORT quantize_static": {}}
    feeds = {}
    for bs in (1, 32):
        ex = (ids[:bs], mask[:bs])
        feeds[bs] = _feed(ex)
        sim = sims["w8a8_transformer"]
        with sim.quantization_disabled():
            paths["FP32"][bs] = export_onnx(sim, os.path.join(tmp, f"lat_fp32_{bs}.onnx"), dynamic_batch=False,
                                            example_inputs=ex)["onnx"]
        paths["edgequant w8a8_transformer"][bs] = export_onnx(sim, os.path.join(tmp, f"lat_eq_{bs}.onnx"),
                                                             dynamic_batch=False, example_inputs=ex)["onnx"]
        paths[f"edgequant {SMOOTHED}"][bs] = export_onnx(sims[SMOOTHED], os.path.join(tmp, f"lat_sm_{bs}.onnx"),
                                                         dynamic_batch=False, example_inputs=ex)["onnx"]
        paths[INT8_ROW][bs] = export_onnx(sims[SMOOTHED], os.path.join(tmp, f"lat_sm8_{bs}.onnx"), dynamic_batch=False,
                                          example_inputs=ex, weight_dtype="int8")["onnx"]
        paths["ORT quantize_static"][bs] = ort_quantize_static(paths["FP32"][bs], [_feed(ex)], os.path.join(tmp, f"lat_qs_{bs}.onnx"))
    return latencies(paths, feeds, threads, repeats)


def main():
    args = timing_parser(__doc__, 128, 128).parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    enc, tok = minilm_l6_v2()
    tmp = tempfile.mkdtemp(prefix="edgequant_bench_tf_")
    results, sims = {}, None
    for seed in (0, 1):
        results[seed], s = run_split(enc, tok, seed, args.calib, args.eval, tmp)
        sims = sims or s
    times = latency_table(tok, sims, tmp, args.threads, args.repeats)
    lines = [f"all-MiniLM-L6-v2 (real weights), sequence length {SEQ}, {args.calib} calibration / {args.eval} evaluation "
             f"sentences per split (`edgequant.data.sentence_split`, seeds 0 and 1), torch {torch.__version__}, "
             f"ONNX Runtime {ort.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}, "
             f"CPU {_cpu()}", "",
             "| row | capture | sim cosine s0 / s1 | sim NN agreement s0 / s1 | ORT cosine s0 / s1 | ORT NN agreement s0 / s1 | build+calibrate s |",
             "|---|---|---|---|---|---|---|"]
    for label in results[0]:
        r0, r1 = results[0][label], results[1][label]

        def pair(key, i):
            return f"{r0[key][i]:.4f} / {r1[key][i]:.4f}" if key in r0 else "-"
        lines.append(f"| {label} | {r0.get('mode', '-')} | {pair('sim', 0)} | {pair('sim', 1)} | {pair('ort', 0)} | "
                     f"{pair('ort', 1)} | {r0['s']:.1f} |" if "s" in r0 else
                     f"| {label} | - | - | - | {pair('ort', 0)} | {pair('ort', 1)} | - |")
    lines += ["", "ONNX Runtime latency (fresh process, median of interleaved runs):", "",
              "| model | batch 1 ms | batch 32 ms | vs FP32 b1 | vs FP32 b32 | vs ORT quantize_static b1 | b32 |",
              "|---|---|---|---|---|---|---|"]
    qs = times["ORT quantize_static"]
    for k, t in times.items():
        lines.append(f"| {k} | {t[1]:.2f} | {t[32]:.1f} | {times['FP32'][1] / t[1]:.2f}x | {times['FP32'][32] / t[32]:.2f}x | "
                     f"{qs[1] / t[1]:.2f}x | {qs[32] / t[32]:.2f}x |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
