"""Where the integer-exact sim and ONNX Runtime part: the first activation quantizer whose integers differ.

For a torchvision model as ``bench_coverage.py`` builds it (random weights, seed 0, one image, W8A8, BN
folded by the sim), export it, then compare each activation quantizer's integers in the sim's
``integer_exact`` mode with ONNX Runtime's on the same input. ORT is asked for one quantizer's
``QuantizeLinear`` output at a time (the graph's only output, so ORT fuses every node before it as in
the full model), and a binary search over the quantizers in the order the sim runs them finds the
first that differs (a difference propagates). It prints that quantizer, the ONNX nodes that compute it
and how many of its elements differ; ``--all`` compares every quantizer instead (slow on big models).

    python benchmarks/diagnose_export.py --model regnet_y_8gf [--source torchvision|timm] [--size 224] [--all] [--options]
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _quantize_outputs(model) -> dict[str, tuple[str, object]]:
    """``{quantizer name: (its QuantizeLinear's output, node)}`` of an exported model."""
    clip_src = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Clip"}
    out = {}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            src = clip_src.get(n.input[0], n.input[0])
            out.setdefault(src, (n.output[0], n))
    return out


def _producers(model, name: str, depth: int = 3) -> list[str]:
    """The op types of the nodes that compute ``name``, ``depth`` hops back."""
    by_out = {o: n for n in model.graph.node for o in n.output}
    seen, frontier, ops = set(), [name], []
    for _ in range(depth):
        nxt = []
        for v in frontier:
            n = by_out.get(v)
            if n is None or n.name in seen:
                continue
            seen.add(n.name)
            ops.append(f"{n.op_type}({', '.join(n.input)})")
            nxt += list(n.input)
        frontier = nxt
    return ops


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--source", choices=("torchvision", "timm"), default="torchvision")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--at", default=None, help="compare this one quantizer only")
    ap.add_argument("--options", action="store_true", help="export and compare with tables=True, float64=True")
    args = ap.parse_args()
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from bench_coverage import _build

    from edgequant import QuantSim, export_onnx
    from edgequant.core.quant import storage_offset

    torch.set_num_threads(int(os.environ.get("EDGEQUANT_BENCH_THREADS", "2")))
    torch.manual_seed(0)
    model, x = _build(args.model, args.size, args.source, {})  # the model and input bench_coverage.py uses
    sim = QuantSim(model, x, "w8a8")
    sim.calibrate([x], progress=False)
    acts = {n: q for n, q in sim.quantizers().items() if not q.is_weight}
    order, ints = [], {}

    def hook(name, q):
        def fn(mod, inp, out):
            if name not in ints:
                order.append(name)
                z = q.zero_point.double() + storage_offset(q.spec.bits, q.spec.signed)
                ints[name] = torch.round(out.detach().double() / q.scale.double() + z).numpy()
        return fn

    hooks = [q.register_forward_hook(hook(n, q)) for n, q in acts.items()]
    options = {"tables": True, "float64": True} if args.options else {}
    with torch.no_grad(), sim.integer_exact(**options):
        sim(x)
    for h in hooks:
        h.remove()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        export_onnx(sim, path, **options)
        onnx_model = onnx.load(str(path))
        q_out = _quantize_outputs(onnx_model)
        order = [n for n in order if n in q_out]
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2

        def ort_ints(name):
            m = onnx.ModelProto()
            m.CopyFrom(onnx_model)
            out_name, node = q_out[name]
            del m.graph.output[:]
            zp = next(i for i in m.graph.initializer if i.name == node.input[2])
            m.graph.output.append(helper.make_tensor_value_info(out_name, zp.data_type, None))
            p = Path(tmp) / "cut.onnx"
            onnx.save(m, str(p))
            sess = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
            return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0].astype(np.float64)

        @functools.lru_cache(maxsize=None)  # the search asks for its final index twice
        def differs(i):
            name = order[i]
            o = ort_ints(name)
            s = ints[name].reshape(o.shape)
            return float((s != o).mean()), float(np.abs(s - o).max())

        print(f"{args.model}: {len(order)} activation quantizers in the export")
        if args.at:
            frac, big = differs(order.index(args.at))
            print(f"{args.at}: {frac:.4f} of the elements differ (max {big:.0f} steps)")
            return
        if args.all:
            for i, name in enumerate(order):
                frac, big = differs(i)
                if frac:
                    print(f"  {i} {name}: {frac:.4f} of the elements differ (max {big:.0f} steps)")
            return
        lo, hi = 0, len(order) - 1
        if differs(hi)[0] == 0:
            print("the last quantizer is identical: no difference")
            return
        while lo < hi:  # the first index that differs
            mid = (lo + hi) // 2
            if differs(mid)[0]:
                hi = mid
            else:
                lo = mid + 1
        frac, big = differs(lo)
        name = order[lo]
        print(f"first difference at quantizer {lo} {name!r} ({acts[name].owner_type}): {frac:.4f} of its elements, "
              f"max {big:.0f} steps")
        print("  computed by:", *_producers(onnx_model, name), sep="\n    ")
        if lo:
            print(f"  the quantizer before it ({order[lo - 1]!r}) is identical")


if __name__ == "__main__":
    main()
