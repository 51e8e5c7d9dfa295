"""Torch-Pruning (torch-pruning 1.6.1) on MobileNetV2: structural channel pruning to a fraction of the MACs.

Its documented use (README "Quickstart"): a ``DependencyGraph``-based ``MetaPruner`` with an importance
criterion (``MagnitudeImportance(p=2)``, group-level L2 norm), the classifier ignored, ``iterative_steps``
small steps of ``pruner.step()``; here the steps stop at the first one that reaches the MAC target
(``tp.utils.count_ops_and_params``). Torch-Pruning has no reconstruction: its README fine-tunes after
pruning; this row reports the model as pruned (no fine-tune), like edgequant's rows, and the same after
BN recalibration is out of scope. Run by ``bench_compress.py --part peers`` in its own environment.

    python run_compress_tp.py <inputs.pt> <out.json> [--targets 0.9,0.8,0.7] [--round-to 1]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch_pruning as tp  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs")
    ap.add_argument("out")
    ap.add_argument("--targets", default="0.9,0.8,0.7")
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--global-pruning", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from edgequant.metrics import fidelity
    from edgequant.models import mobilenet_v2_imagenet

    data = torch.load(args.inputs)
    ex, ev = data["example"], data["evaluation"]
    base = mobilenet_v2_imagenet().eval()
    with torch.no_grad():
        ref = torch.cat([base(t) for t in ev.split(32)])
    macs0, _ = tp.utils.count_ops_and_params(base, ex)
    rows = []
    for target in (float(t) for t in args.targets.split(",")):
        model = mobilenet_v2_imagenet().eval()
        t0 = time.perf_counter()
        steps = 50
        pruner = tp.pruner.MetaPruner(model, ex, importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=1.0, iterative_steps=steps, ignored_layers=[model.classifier[1]],
                                      global_pruning=args.global_pruning, round_to=args.round_to if args.round_to > 1 else None)
        macs = macs0
        for _ in range(steps):
            pruner.step()
            macs, _ = tp.utils.count_ops_and_params(model, ex)
            if macs <= target * macs0:
                break
        sec = time.perf_counter() - t0
        with torch.no_grad():
            f = fidelity(ref, torch.cat([model(t) for t in ev.split(32)]))
        rows.append({"peer": "torch-pruning", "version": tp.__version__, "target": target, "macs": macs / macs0,
                     "top1": f.top1, "sqnr_db": f.sqnr_db, "seconds": sec,
                     "method": f"MetaPruner, MagnitudeImportance(p=2), {'global' if args.global_pruning else 'uniform'} "
                               f"ratio, round_to={args.round_to}, no fine-tune"})
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
