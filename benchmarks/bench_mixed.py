"""Mixed precision on real MobileNetV2: the accuracy / bit-operation front between W8A16 and W4A8.

MobileNetV2 (ImageNet weights, batch norms folded), calibrated on photo crops; every point of the front
is scored on crops of other photos (logit SQNR against FP32) as well as on the scoring crops the search
used, next to uniform W8A8 and uniform W4A8 (nearest rounding).

    python benchmarks/bench_mixed.py [--calib 64] [--eval 64] [--out benchmarks/results/mixed_precision.md]
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, _ = fold_batch_norms(mobilenet_v2_imagenet().eval())
    calib = [calibration_crops(args.calib)[i:i + 16] for i in range(0, args.calib, 16)]
    x = evaluation_crops(args.eval)
    with torch.no_grad():
        ref = torch.cat([model(x[i:i + 32]) for i in range(0, len(x), 32)])
    t0 = time.perf_counter()
    res = mixed_precision(model, calib, high="w8a16", low="w4a8", max_drop=1.0)
    search_s = time.perf_counter() - t0
    rows = []
    for cfg in ("w8a16", "w8a8", "w4a8"):
        sim = QuantSim(model, calib[0], cfg)
        sim.calibrate(calib, progress=False)
        f = _held_out(sim, ref, x)
        rows.append(f"| uniform {cfg} | {sim.cost().bops / 1e9:.2f} | {f.sqnr_db:.2f} | {f.top1:.3f} |")
    f = _held_out(res.sim, ref, x)
    rows.append(f"| mixed, chosen (max drop 1 dB on the search's crops) | {res.chosen.bops / 1e9:.2f} | {f.sqnr_db:.2f} | {f.top1:.3f} |")
    text = (f"MobileNetV2 (ImageNet weights, BN folded); {args.calib} calibration crops, {args.eval} held-out evaluation "
            f"crops (other photos); torch threads 2, load average {os.getloadavg()[0]:.2f}; search {search_s:.0f} s "
            f"(two calibrations, {len(res.front)} front points kept, the final rebuild included)\n\n"
            "| configuration | G bit-ops | held-out logit SQNR dB | held-out top-1 agreement |\n|---|---|---|---|\n"
            + "\n".join(rows) + "\n\nthe front, scored by the search on its own crops:\n\n" + res.to_markdown() + "\n")
    print(text)
    if args.out:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
