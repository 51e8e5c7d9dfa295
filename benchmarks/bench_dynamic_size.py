"""One ONNX file for every image size: ``export_onnx(sim, path, dynamic_size=None)`` on torchvision models.

Per model (W8A8, random weights, BN folded, calibrated on two random images at the example size): export with symbolic
height and width where the graph allows (the check builds it again 32 pixels larger), then run the file in ONNX Runtime
on an image of another size and aspect ratio and compare with ``sim.integer_exact()`` at that size: the fraction of
bit-identical outputs (for a detector: its regions exported by ``RegionSim``, the detections of the deployed model).
A model whose graph computes something from its input size is listed with the node the export names.

Usage: python benchmarks/bench_dynamic_size.py [--models a,b,...] [--out FILE.md]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch.utils import _pytree as pytree

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLASSIFICATION = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "regnet_x_400mf",
                  "densenet121", "googlenet", "shufflenet_v2_x1_0", "squeezenet1_0", "mnasnet0_5", "convnext_tiny",
                  "alexnet", "vgg11", "vit_b_16", "swin_t")
DENSE = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50")
DETECTION = {"fasterrcnn_mobilenet_v3_large_320_fpn": {"box_score_thresh": 0.0}, "ssdlite320_mobilenet_v3_large": {}}
EXAMPLE, OTHER = (224, 224), (192, 288)


def _leaves(x) -> list:
    return [t for t in pytree.tree_leaves(x) if torch.is_tensor(t)]


def _symbolic(path) -> str:
    """The declared shape of the first input, symbolic dimensions by name."""
    dims = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
    return "[" + ", ".join(d.dim_param or str(d.dim_value) for d in dims) + "]"


def run_one(name: str, folder: str) -> dict:
    import onnxruntime as ort
    import torchvision

    from edgequant import QuantSim, RegionSim, export_onnx
    from edgequant.export.regions import deployed

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    t = time.perf_counter()
    extra = {"weights_backbone": None, **DETECTION.get(name, {})} if name in DENSE or name in DETECTION else {}
    model = torchvision.models.get_model(name, weights=None, **extra).eval()  # nothing downloaded
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if name in DETECTION:
            sim = RegionSim(model, ([torch.rand(3, 320, 320, generator=g)],))
            sim.calibrate([([torch.rand(3, 320, 320, generator=g)],) for _ in range(2)], progress=False)
            paths = export_onnx(sim, Path(folder) / name, dynamic_size=None)
            x = ([torch.rand(3, 240, 400, generator=g)],)
            got_fn = deployed(sim, paths)
            declared = "; ".join(f"{r}: {_symbolic(p['onnx'])}" for r, p in paths.items())
        else:
            sim = QuantSim(model, torch.rand(1, 3, *EXAMPLE, generator=g), "w8a8")
            sim.calibrate([torch.rand(2, 3, *EXAMPLE, generator=g)], progress=False)
            path = export_onnx(sim, Path(folder) / f"{name}.onnx", dynamic_size=None)["onnx"]
            x = (torch.rand(1, 3, *OTHER, generator=g),)
            s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            got_fn = lambda x: [torch.from_numpy(o) for o in s.run(None, {s.get_inputs()[0].name: x.numpy()})]  # noqa: E731
            declared = _symbolic(path)
    kept = [str(w.message).split("; the export keeps")[0] for w in caught if "height and width" in str(w.message)]
    row = {"model": name, "declared": declared, "static": kept}
    if kept and name not in DETECTION:
        return dict(row, identical=None, seconds=time.perf_counter() - t)
    with torch.no_grad():
        got = _leaves(got_fn(*x))
        with sim.integer_exact():
            want = _leaves(sim(*x))
    same_shapes = [tuple(a.shape) == tuple(b.shape) for a, b in zip(got, want)]
    identical = float(np.mean([(a == b).float().mean().item() for a, b in zip(got, want)])) if all(same_shapes) else 0.0
    return dict(row, identical=identical, shape=[list(a.shape) for a in got][:3], seconds=time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(CLASSIFICATION + DENSE + tuple(DETECTION)))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    folder = tempfile.mkdtemp(prefix="edgequant_dyn_")
    rows = []
    for name in args.models.split(","):
        try:
            rows.append(run_one(name, folder))
        except Exception as e:  # noqa: BLE001 -- a failure is a row of the table
            rows.append({"model": name, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"})
        print(rows[-1], flush=True)
    import torchvision

    lines = [f"torchvision {torchvision.__version__} at W8A8 (random weights), exported with "
             f"`export_onnx(sim, path, dynamic_size=None)` from a {EXAMPLE[0]}x{EXAMPLE[1]} example (detectors: regions "
             f"from a 320x320 image), run in ONNX Runtime at {OTHER[0]}x{OTHER[1]} (detectors: a 240x400 image) against "
             "`sim.integer_exact()` at that size. Generated by `python benchmarks/bench_dynamic_size.py`.", "",
             "| model | input declared | kept at the example's size (first node that differs) | identical outputs at the other size | s |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | - | error: {r['error']} | - | - |")
            continue
        ident = "-" if r["identical"] is None else f"{r['identical']:.4f}"
        lines.append(f"| {r['model']} | {r['declared']} | {'; '.join(r['static']) or '-'} | {ident} | {r['seconds']:.1f} |")
    dynamic = [r for r in rows if "error" not in r and r["identical"] is not None and not r["static"]]
    lines += ["", f"Symbolic height and width: {len(dynamic)} of {len(rows)} models; bit-identical to the integer-exact "
              f"sim at the other size: {sum(r['identical'] == 1.0 for r in dynamic)} of them."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
