"""Mixed precision on real MobileNetV2: the accuracy / bit-operation front between W8A16 and W4A8.

MobileNetV2 (ImageNet weights, batch norms folded), calibrated on photo crops. Two searches: the greedy
front alone (AIMET's two phases), and greedy + exact knapsack with AdaRound-rounded low weights. For each,
the best point within a ladder of bit-operation budgets is rebuilt and scored on crops of other photos
(logit SQNR against FP32, top-1 agreement), next to uniform W8A16, W8A8, W4A8 and W4A8 + AdaRound. Every
sim is bias-corrected (the search's default; the uniform rows alike). Two
splits: the calibration and evaluation photos, then the same swapped (``--splits both``).

    python benchmarks/bench_mixed.py [--calib 64] [--eval 64] [--adaround 200] [--out benchmarks/results/mixed_precision.md]
"""
import argparse
import os
import time

import torch

from edgequant import QuantSim
from edgequant.analysis import mixed_precision
from edgequant.data import calibration_crops, evaluation_crops
from edgequant.io.encodings import atomic_write_text
from edgequant.metrics import fidelity
from edgequant.models import mobilenet_v2_imagenet
from edgequant.ptq import fold_batch_norms


def _held_out(sim, ref, x):
    with torch.no_grad():
        return fidelity(ref, torch.cat([sim(x[i:i + 32]) for i in range(0, len(x), 32)]))


BUDGETS = (0.30, 0.40, 0.50, 0.75)  # shares of uniform W8A16's bit operations (W8A8 is 0.50, W4A8 0.25)


def _split(model, calib_x, eval_x, args) -> list[str]:
    from edgequant.ptq import correct_bias
    from edgequant.ptq.adaround import adaround

    calib = [calib_x[i:i + 16] for i in range(0, len(calib_x), 16)]
    with torch.no_grad():
        ref = torch.cat([model(eval_x[i:i + 32]) for i in range(0, len(eval_x), 32)])
    rows = []
    for cfg, ada in (("w8a16", 0), ("w8a8", 0), ("w4a8", 0), ("w4a8", args.adaround)):
        t = time.perf_counter()
        sim = QuantSim(model, calib[0], cfg)
        sim.calibrate(calib, progress=False)
        if ada:
            adaround(sim, calib, iterations=ada, progress=False)
            sim.calibrate(calib, progress=False)
        correct_bias(sim, calib, measure=False, progress=False)
        f = _held_out(sim, ref, eval_x)
        name = f"uniform {cfg}" + (f" + AdaRound ({ada} it)" if ada else "") + " + bias correction"
        rows.append(f"| {name} | {sim.cost().bops / 1e9:.2f} | {f.sqnr_db:.2f} | {f.top1:.3f} | {time.perf_counter() - t:.0f} |")
    for label, kw in (("greedy", dict(knapsack_points=0)), (f"greedy + knapsack, AdaRound low ({args.adaround} it)",
                                                         dict(knapsack_points=12, low_adaround=args.adaround))):
        t = time.perf_counter()
        res = mixed_precision(model, calib, high="w8a16", low="w4a8", max_drop=1.0, progress=False, **kw)
        search_s = time.perf_counter() - t
        for b in BUDGETS:
            within = [p for p in res.front if p.bops <= b * res.high_bops]
            if not within:
                continue
            p = max(within, key=lambda q: q.score)
            sim, _ = res.build(p)
            f = _held_out(sim, ref, eval_x)
            rows.append(f"| mixed {label}, budget {b:.2f} of W8A16 | {p.bops / 1e9:.2f} | {f.sqnr_db:.2f} | {f.top1:.3f} | "
                        f"{search_s:.0f} (search, {len(res.front)} front points) |")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=64)
    ap.add_argument("--adaround", type=int, default=200, help="AdaRound iterations per layer for the W4 candidates")
    ap.add_argument("--splits", choices=["one", "swapped", "both"], default="both")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, _ = fold_batch_norms(mobilenet_v2_imagenet().eval())
    a, b = calibration_crops(args.calib), evaluation_crops(args.eval)
    text = [f"MobileNetV2 (ImageNet weights, BN folded); {args.calib} calibration crops, {args.eval} held-out evaluation "
            f"crops of other photos; torch threads 2, load average {os.getloadavg()[0]:.2f}. Candidates per quantizer: "
            "W8A16 (high) / W4A8 (low); the inputs of an add or concat move together. Held-out: logit SQNR against "
            "FP32 and top-1 agreement on the evaluation crops; the search scores on 2 batches of its calibration crops. "
            "Every sim is bias-corrected on the calibration crops (empirical; in the search each candidate brings its "
            "own corrected bias).", ""]
    splits = [("calibration photos -> evaluation photos", a, b)] if args.splits != "swapped" else []
    if args.splits != "one":
        splits.append(("swapped: evaluation photos -> calibration photos", b[:args.calib], a[:args.eval]))
    for name, cx, ex in splits:
        text += [f"## split: {name}", "", "| configuration | G bit-ops | held-out SQNR dB | held-out top-1 agreement | seconds |",
                 "|---|---|---|---|---|"] + _split(model, cx, ex, args) + [""]
        print("\n".join(text), flush=True)
        if args.out:  # after each split: a stopped run keeps what it measured
            atomic_write_text(args.out, "\n".join(text) + "\n")


if __name__ == "__main__":
    main()
