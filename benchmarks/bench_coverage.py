"""Architecture coverage: torchvision's models through the six stages of deployment at W8A8.

Stages per model (random weights, BatchNorm folded first as an integer runtime folds it, one image):
capture (``QuantSim``), calibrate, sim forward, ``export_onnx``, ONNX Runtime runs the export, ORT's
top-1 equals the sim's (and the ORT-vs-sim logit SQNR), and the integer-exact sim is bit-identical to
ORT. Each model runs in its own process with a time limit; the table lists the first stage that failed
and its error, the ONNX op types that stayed in float (between DequantizeLinear and QuantizeLinear
rather than fused into ORT's integer kernels is not checked here: see ``bench_export.py``), and seconds.

Segmentation and detection models (``DENSE``) follow the classification ones.

Usage: python benchmarks/bench_coverage.py [--models a,b,...] [--size 224] [--timeout 600]
       [--out benchmarks/results/coverage.md]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("capture", "calibrate", "sim forward", "export", "ORT runs", "ORT top-1 = sim", "integer-exact = ORT")
#: models whose input size is fixed by their architecture
SIZES = {"inception_v3": 299, "vit_h_14": 224}
#: segmentation and detection models that fit on the machine (their backbones without weights too)
DENSE = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50", "deeplabv3_resnet50",
         "ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn")
#: ops that ONNX Runtime runs on integers when fed by DequantizeLinear and followed by QuantizeLinear
INTEGER_OPS = {"Conv", "Gemm", "MatMul", "Add", "Mul", "AveragePool", "GlobalAveragePool", "MaxPool", "Concat",
               "Reshape", "Flatten", "Transpose", "Relu", "Clip", "Squeeze", "Unsqueeze", "Resize", "Split",
               "Slice", "Gather", "Identity", "Sigmoid", "LeakyRelu"}


def run_one(name: str, size: int, out: dict) -> None:
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    import torchvision

    from edgequant import QuantSim, export_onnx
    from edgequant.metrics import sqnr_db

    torch.set_num_threads(int(os.environ.get("EDGEQUANT_BENCH_THREADS", "2")))
    torch.manual_seed(0)
    t0 = time.perf_counter()
    stage = "capture"
    try:
        dense = name in DENSE
        model = torchvision.models.get_model(name, weights=None, **({"weights_backbone": None} if dense else {})).eval()
        size = SIZES.get(name, size)
        x = torch.randn(1, 3, size, size)
        out["parameters_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
        sim = QuantSim(model, x, "w8a8")  # as built: the sim folds batch norms itself (fold_bn=True)
        out["capture_mode"] = sim.capture_mode
        out["bn_folded"], out["bn_left"] = len(sim.bn_folding.folded), len(sim.bn_folding.skipped)
        stage = "calibrate"
        sim.calibrate([x], progress=False)
        stage = "sim forward"
        with torch.no_grad():
            y = sim(x)
        y = y if torch.is_tensor(y) else next(iter(y.values())) if isinstance(y, dict) else y[0]
        stage = "export"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.onnx"
            export_onnx(sim, path)
            ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
            out["float_ops"] = sorted(set(ops) - INTEGER_OPS - {"QuantizeLinear", "DequantizeLinear", "Constant"})
            stage = "ORT runs"
            so = ort.SessionOptions()
            so.intra_op_num_threads = 2
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            o = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        stage = "integer-exact = ORT"  # computed first: it tells a top-1 flip of near-tied logits from an export error
        with torch.no_grad(), sim.integer_exact():
            ye = sim(x)
        ye = ye if torch.is_tensor(ye) else next(iter(ye.values())) if isinstance(ye, dict) else ye[0]
        ye = ye.detach().float().numpy().reshape(o.shape)
        out["identical_fraction"] = float((ye == o).mean())
        exact = f"; integer-exact sim vs ORT: {out['identical_fraction']:.4f} identical"
        stage = "ORT top-1 = sim"
        yy = y.detach().float().numpy().reshape(o.shape)
        out["ort_sqnr_db"] = float(sqnr_db(torch.from_numpy(yy), torch.from_numpy(o)))
        if yy.ndim == 4:  # segmentation: the class of every pixel
            out["pixel_agreement"] = float((yy.argmax(1) == o.argmax(1)).mean())
            if out["pixel_agreement"] < 0.99:
                raise AssertionError(f"{out['pixel_agreement']:.4f} of the pixels get the same class (SQNR {out['ort_sqnr_db']:.1f} dB){exact}")
        elif yy.ndim >= 2 and not np.array_equal(yy.reshape(len(yy), -1).argmax(1), o.reshape(len(o), -1).argmax(1)):
            raise AssertionError(f"top-1 differs (SQNR {out['ort_sqnr_db']:.1f} dB){exact}")
        stage = "integer-exact = ORT"
        if not np.array_equal(ye, o):
            raise AssertionError(f"{out['identical_fraction']:.4f} of the outputs identical")
        stage = "done"
    except Exception as e:  # noqa: BLE001 -- every failure is a row of the table
        out["error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]
        out["trace"] = traceback.format_exc()[-1500:]
    out["stage"] = stage
    out["seconds"] = round(time.perf_counter() - t0, 1)


def _child(name, size, q):
    out = {"model": name}
    run_one(name, size, out)
    q.put(out)


def main():
    import torchvision

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="comma-separated (default: every classification model)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "coverage.md"))
    ap.add_argument("--results", default=str(REPO / ".peers" / "coverage.jsonl"), help="one JSON line per model (resumable)")
    ap.add_argument("--table-only", action="store_true", help="table the results already in --results, run nothing")
    args = ap.parse_args()
    names = args.models.split(",") if args.models else torchvision.models.list_models(module=torchvision.models) + list(DENSE)
    done = {}
    res_path = Path(args.results)
    res_path.parent.mkdir(parents=True, exist_ok=True)
    if res_path.exists():
        for line in res_path.read_text().splitlines():
            r = json.loads(line)
            done[r["model"]] = r
    ctx = mp.get_context("spawn")
    for name in names:
        if args.table_only or (name in done and not args.models):
            continue
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=(name, args.size, q))
        p.start()
        p.join(args.timeout)
        if p.is_alive():
            p.kill()
            r = {"model": name, "stage": "timeout", "error": f"over {args.timeout} s"}
        else:
            r = q.get() if not q.empty() else {"model": name, "stage": "crashed", "error": f"exit code {p.exitcode}"}
        r.pop("trace", None) if r.get("stage") == "done" else None
        done[name] = r
        with open(res_path, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"{name:28s} {r['stage']:22s} {r.get('seconds', '')} {r.get('error', '')[:150]}", flush=True)
    rows = [done[n] for n in names if n in done]
    passed = {s: sum(1 for r in rows if r["stage"] == "done" or STAGES.index(r["stage"]) > i
                     if r["stage"] in STAGES or r["stage"] == "done") for i, s in enumerate(STAGES)}
    lines = [f"torchvision {torchvision.__version__} models at W8A8 (random weights, BN folded, one "
             f"{args.size}x{args.size} image; inception_v3 at 299): {len(rows)} models, the "
             f"{len(torchvision.models.list_models(module=torchvision.models))} classification models and "
             f"{len(DENSE)} segmentation/detection models (segmentation: 'top-1' is the class of >= 99% of the pixels).", "",
             "| stage | models through it |", "|---|---|"]
    lines += [f"| {s} | {passed[s]} / {len(rows)} |" for s in STAGES]
    lines += ["", "| model | M params | through | ORT vs sim dB | float ops in the export | s | error |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r.get('parameters_m', '')} | {r['stage']} | "
                     f"{'' if r.get('ort_sqnr_db') is None else format(r['ort_sqnr_db'], '.1f')} | "
                     f"{', '.join(r.get('float_ops', []))} | {r.get('seconds', '')} | {r.get('error', '')[:160].replace('|', '/')} |")
    text = "\n".join(lines)
    print("\n" + text)
    from edgequant.io.encodings import atomic_write_text

    atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
