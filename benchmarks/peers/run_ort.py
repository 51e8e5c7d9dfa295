"""ONNX Runtime's own static quantization (``quantize_static``, QDQ) of the same BN-folded float model.

Its QDQ models are evaluated with graph optimizations off, i.e. by the QDQ semantics (DequantizeLinear
-> float op -> QuantizeLinear): on x86 CPUs without VNNI its fused int8-weight kernels saturate
(see bench_export), which would understate its quantization. Timing uses the optimized session.
"""
from __future__ import annotations

import onnxruntime as ort
from common import THREADS, Data, Recorder, main_args, timed
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantType, quantize_static


def session(path, optimize=True, threads=THREADS):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def runner(path, optimize=False):
    s = session(path, optimize=optimize)
    name = s.get_inputs()[0].name
    return lambda b: s.run(None, {name: b.numpy()})[0]


class Reader(CalibrationDataReader):
    def __init__(self, batches, name):
        self.it = iter([{name: b.numpy()} for b in batches])

    def get_next(self):
        return next(self.it, None)


def main():
    args = main_args()
    data = Data(args.data)
    rec = Recorder("onnxruntime", ort.__version__, args.out, data)
    out = rec.out

    def quant(src, batches, dst, **kw):
        name = session(src).get_inputs()[0].name
        kw.setdefault("activation_type", QuantType.QUInt8)
        kw.setdefault("weight_type", QuantType.QInt8)
        quantize_static(str(src), str(dst), Reader(batches, name), quant_format=1, **kw)
        return dst

    def pair(tag, **kw):
        def run():
            p, t = timed(lambda: quant(data.fp32_onnx, data.cal_batches(), out / f"{tag}.onnx", **kw))
            if not data.has_mnist:
                return dict(seconds=t, imagenet=runner(p), fp32=runner(data.fp32_onnx))
            mp, mt = timed(lambda: quant(data.mnist_fp32_onnx, data.mnist_cal_batches(), out / f"{tag}.mnist.onnx", **kw))
            return dict(seconds=t, imagenet=runner(p), fp32=runner(data.fp32_onnx), mnist=runner(mp), mnist_seconds=mt)
        return run

    pct = dict(calibrate_method=CalibrationMethod.Percentile, extra_options={"CalibPercentile": 99.99})
    todo = {
        "w8a8_pc": [("quantize_static per-channel, MinMax", pair("w8a8_pc_minmax", per_channel=True)),
                    ("quantize_static per-channel, Percentile 99.99", pair("w8a8_pc_pct", per_channel=True, **pct))],
        "w8a8_pt": [("quantize_static per-tensor, MinMax", pair("w8a8_pt", per_channel=False))],
        "w4a8_nearest": [("quantize_static per-channel int4 weights, MinMax",
                          pair("w4a8", per_channel=True, weight_type=QuantType.QInt4))],
    }
    for row in args.rows:
        for method, run in todo.get(row, []):
            rec.row(row, method, run)


if __name__ == "__main__":
    main()
