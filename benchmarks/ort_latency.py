"""ONNX Runtime helpers shared by the benchmarks that time exported models: latency measured in a fresh
process, and ONNX Runtime's own ``quantize_static`` (the bar for speed).

torch's OpenMP threads keep spinning after its last op and slowed ONNX Runtime by up to 4x in the same
process, so sessions are timed in a spawned process that never imports torch. Models are run
interleaved (one run of each in turn), so a load change on the machine hits every model alike.
"""
from __future__ import annotations

import statistics
import time


def _time_sessions(paths, feeds, threads, repeats, queue):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    out = {k: {} for k in paths}
    for bs, feed in feeds.items():
        sessions = {k: ort.InferenceSession(p[bs], so, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
        for s in sessions.values():  # warm-up
            s.run(None, feed)
        samples = {k: [] for k in sessions}
        for _ in range(repeats):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feed)
                samples[k].append(time.perf_counter() - t)
        for k in sessions:
            out[k][bs] = statistics.median(samples[k]) * 1000
    queue.put(out)


def latencies(paths: dict, feeds: dict, threads: int, repeats: int) -> dict:
    """``{label: {batch: median ms}}`` for ``paths = {label: {batch: onnx path}}`` fed ``feeds = {batch:
    {input name: array}}``."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_time_sessions, args=(paths, feeds, threads, repeats, q))
    p.start()
    res = q.get()
    p.join()
    return res


def timing_parser(doc: str, calib: int, evaluation: int):
    """The command line the timing benchmarks share: data sizes, repeats, threads, output file."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=calib)
    ap.add_argument("--eval", type=int, default=evaluation)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    return ap


def emit(lines: list[str], out) -> None:
    """Print the table and write it to ``out`` (atomically) when given."""
    text = "\n".join(lines)
    print(text)
    if out:
        from edgequant.io.encodings import atomic_write_text

        atomic_write_text(out, text + "\n")


def ort_quantize_static(fp32_path, feeds: list[dict], out, **options) -> str:
    """ONNX Runtime's own static QDQ quantization of ``fp32_path`` calibrated on ``feeds`` (input name ->
    array, one dict per batch): per-channel int8 weights, uint8 activations, MinMax; ``options`` go to
    ``quantize_static`` (``reduce_range=True``: its setting for x86 CPUs without VNNI). Returns ``out``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    quantize_static(fp32_path, out, Reader(), per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, **options)
    return out
