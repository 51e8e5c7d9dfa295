"""Does the per-quantizer analysis find the known problems of real MobileNetV2?

MobileNetV2 (ImageNet weights) with batch norms folded and per-tensor W8A8 (`w8a8_per_tensor`): folding
spreads the depthwise layers' channel ranges (a few channels far wider than the rest), which per-tensor
weight grids cannot cover; and the logits' range. Prints the ranking and the time, writes Markdown.

    python benchmarks/bench_analysis.py [--calib 64] [--eval 32] [--out benchmarks/results/analysis.md]
"""
import argparse
import os
import time

import torch

from edgequant.analysis import analyze
from edgequant.data import calibration_crops, evaluation_crops
from edgequant.io.encodings import atomic_write_text
from edgequant.models import mobilenet_v2_imagenet
from edgequant.ptq import fold_batch_norms


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=32)
    ap.add_argument("--config", default="w8a8_per_tensor")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, _ = fold_batch_norms(mobilenet_v2_imagenet().eval())
    calib = [calibration_crops(args.calib)[i:i + 16] for i in range(0, args.calib, 16)]
    ev = [evaluation_crops(args.eval)]
    t0 = time.perf_counter()
    report = analyze(model, calib, args.config, eval_data=ev)
    dw = [q for q in report.quantizers[:10] if q.role == "weight"]
    text = (f"MobileNetV2 (ImageNet weights), batch norms folded, `{args.config}`; {args.calib} calibration crops, "
            f"{args.eval} evaluation crops (other photos); torch threads 2, load average {os.getloadavg()[0]:.2f}; "
            f"analysis {time.perf_counter() - t0:.1f} s (calibration included)\n\n" + report.to_markdown(15) +
            f"\n\nweights among the 10 worst: {len(dw)}; of them with a channel spread > 4x (per-tensor grids starve their small channels): "
            f"{sum(1 for q in dw if (q.channel_spread or 0) > 4)}\n")
    print(text)
    if args.out:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
