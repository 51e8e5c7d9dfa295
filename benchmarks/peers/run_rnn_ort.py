"""ONNX Runtime's own quantization of the row-by-row MNIST LSTM / GRU classifiers of issue 12 (``bench_rnn_peers.py``).

Documented entry points: ``torch.onnx.export(..., dynamo=False)`` (TorchScript exporter: ``nn.LSTM`` / ``nn.GRU``
become ONNX ``LSTM`` / ``GRU`` ops, the classifier a ``Gemm``), then
``onnxruntime.quantization.quantize_dynamic`` (default settings: int8 weights per tensor; its IntegerOps registry
turns ``LSTM`` into ``com.microsoft.DynamicQuantizeLSTM`` and ``MatMul`` into ``MatMulInteger``; ``GRU`` and
``Gemm`` have no entry) and ``quantize_static`` with a ``CalibrationDataReader`` over the 512 calibration digits,
``quant_format=QuantFormat.QDQ``, other settings at their defaults (MinMax, int8 activations and weights, per
tensor). Its QDQ registry has no ``LSTM`` / ``GRU`` entry.

Each row's notes list which ops of the quantized graph are quantized (found in the graph, not assumed). A row
whose recurrent op was left in float is recorded as a failure with that text (the accuracy of the model as
returned is kept in ``partial_accuracy`` only). Accuracy runs in an ``InferenceSession`` with ORT's default
graph optimizations (1 intra-op thread); the static QDQ model is also scored with optimizations off (the QDQ
semantics: DequantizeLinear -> float op -> QuantizeLinear), as ``run_ort.py`` does.

``--latency``: FP32 vs each int8 model at batch 1 and 64, median of ``--repeats`` runs (after 3 warm-ups),
``intra_op_num_threads=2``, default optimizations; the load average is recorded (the machine may be shared).
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository (edgequant)

import torch

torch.set_num_threads(1)

import onnx
import onnxruntime as ort
from run_ort import Reader, runner, session  # noqa: E402 -- the image runner's ORT helpers
from bench_rnn_peers import (
    RAW,
    PeerRows,
    accuracy,
    load_model,
    load_split,
    runner_args,
    selected,
)
from onnxruntime.quantization import (
    QuantFormat,
    quantize_dynamic,
    quantize_static,
)

ONNX_DIR = RAW / "onnx"
RECURRENT = ("LSTM", "GRU", "RNN")


def export(net, x, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(net, (x[:1],), str(path), dynamo=False, input_names=["rows"], output_names=["logits"],
                          dynamic_axes={"rows": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
    return path


def inventory(path) -> tuple[str, list[str]]:
    """``(summary, recurrent ops left in float)`` of a quantized graph."""
    g = onnx.load(str(path)).graph
    producers = {o: n for n in g.node for o in n.output}
    counts = {}
    for n in g.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    quantized, float_rec = [], []
    for n in g.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"):
            continue
        fed_by_dq = any(i in producers and producers[i].op_type == "DequantizeLinear" for i in n.input)
        if "Integer" in n.op_type or n.op_type.startswith(("QLinear", "DynamicQuantize")) or fed_by_dq:
            quantized.append(n.op_type)
        elif n.op_type in RECURRENT:
            float_rec.append(n.op_type)
    q = ", ".join(f"{t} x{quantized.count(t)}" for t in sorted(set(quantized))) or "none"
    summary = (f"quantized ops: {q}; recurrent ops left float: {', '.join(float_rec) or 'none'}; "
               f"Q/DQ nodes: {counts.get('QuantizeLinear', 0)}/{counts.get('DequantizeLinear', 0)}")
    return summary, float_rec


def float_row(net, xte, fp32: Path):
    export(net, xte, fp32)
    ref = net(xte[:64])
    diff = float((torch.as_tensor(runner(fp32, True)(xte[:64])) - ref).abs().max())
    return runner(fp32, True), f"torch.onnx.export dynamo=False, opset 17; max |ORT - torch| logit {diff:.1e}"


def quant_row(kind: str, fp32: Path, dst: Path, cal, xte, yte, optimize=True):
    if not fp32.exists():
        raise FileNotFoundError(f"{fp32} (the FP32 export failed)")
    if kind == "dynamic":
        quantize_dynamic(str(fp32), str(dst))
    else:
        name = session(fp32).get_inputs()[0].name
        quantize_static(str(fp32), str(dst), Reader(cal, name), quant_format=QuantFormat.QDQ)
    summary, float_rec = inventory(dst)
    if float_rec:
        part = accuracy(runner(dst, optimize), xte, yte)
        raise NotImplementedError(
            f"quantize_{kind} left the {'/'.join(float_rec)} op in float ({summary}); "
            f"partial_accuracy (model as returned) = {part:.4f}")
    return runner(dst, optimize), summary


def main():
    args = runner_args()
    rec = PeerRows("ort", ort.__version__)
    if args.latency:
        return latency(rec, args)
    for entry in selected(args):
        xcal, xte, yte = load_split(entry["split"])
        cal = list(xcal.split(64))
        net = load_model(entry)
        stem = ONNX_DIR / f"split{entry['split']}_{entry['arch']}"
        fp32 = Path(f"{stem}.fp32.onnx")
        rec.row(entry, "FP32 ONNX in ORT", partial(float_row, net, xte, fp32), xte, yte)
        dyn, sta = Path(f"{stem}.dynamic.onnx"), Path(f"{stem}.static_qdq.onnx")
        for config, kind, dst, optimize in [("quantize_dynamic (defaults)", "dynamic", dyn, True),
                                            ("quantize_static QDQ (defaults), optimized session", "static", sta, True),
                                            ("quantize_static QDQ (defaults), unoptimized session", "static", sta, False)]:
            run = partial(quant_row, kind, fp32, dst, cal, xte, yte, optimize)
            r = rec.row(entry, config, run, xte, yte)
            if r.get("error", "").startswith("NotImplementedError") and "partial_accuracy" in r["error"]:
                r["partial_accuracy"] = float(r["error"].rsplit("=", 1)[1])
                rec.save()
    return None


def latency(rec, args):
    rows = []
    for entry in selected(args):
        _, xte, _ = load_split(entry["split"])
        stem = ONNX_DIR / f"split{entry['split']}_{entry['arch']}"
        files = {k: Path(f"{stem}.{k}.onnx") for k in ("fp32", "dynamic", "static_qdq")}
        base = {}
        for kind, path in files.items():
            if not path.exists():
                continue
            s = session(path, threads=2)
            name = s.get_inputs()[0].name
            for batch in (1, 64):
                feed = {name: xte[:batch].numpy()}
                for _ in range(3):
                    s.run(None, feed)
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    s.run(None, feed)
                    times.append(time.perf_counter() - t0)
                ms = 1e3 * statistics.median(times)
                if kind == "fp32":
                    base[batch] = ms
                r = {"split": entry["split"], "arch": entry["arch"], "model": kind, "batch": batch, "median_ms": ms,
                     "ratio_vs_fp32": ms / base[batch] if batch in base else float("nan"), "repeats": args.repeats,
                     "intra_op_num_threads": 2, "load_average": os.getloadavg()[0]}
                rows.append(r)
                print(r, flush=True)
    keys = {(r["split"], r["arch"], r["model"], r["batch"]) for r in rows}
    rec.latency = [r for r in rec.latency if (r["split"], r["arch"], r["model"], r["batch"]) not in keys] + rows
    rec.save()


if __name__ == "__main__":
    main()
