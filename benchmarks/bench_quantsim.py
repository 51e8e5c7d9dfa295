"""QuantSim on real MobileNetV2 (ImageNet weights), real photo crops, batch 32.

Prints, measured side by side in one run:
* sim forward time / FP32 forward time (target <= 1.3), per preset;
* calibration time;
* fidelity to FP32 (top-1 agreement, top-5 overlap, logit SQNR, KL) for W8A8 per-channel,
  W8A8 per-tensor and W4A8 per-channel (nearest rounding).

Usage: python benchmarks/bench_quantsim.py [--calib 256] [--eval 512] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from edgequant import QuantSim
from edgequant.analysis import fidelity
from edgequant.data import calibration_crops, evaluation_crops
from edgequant.models import mobilenet_v2_imagenet


def timed(fn, repeats):
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--eval", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    model = mobilenet_v2_imagenet()
    calib, ev = calibration_crops(args.calib), evaluation_crops(args.eval)
    batch = ev[:32]
    with torch.no_grad():
        ref = torch.cat([model(b) for b in ev.split(32)])
    rows = []
    for cfg in ("w8a8", "w8a8_per_tensor", "w4a8"):
        sim = QuantSim(model, calib[:1], config=cfg)
        rep = sim.calibrate(calib.split(32), progress=False)
        with torch.no_grad():
            out = torch.cat([sim(b) for b in ev.split(32)])
            # FP32 and sim timed alternately in the same run
            t_fp = timed(lambda: model(batch), args.repeats)
            t_sim = timed(lambda: sim(batch), args.repeats)
        f = fidelity(ref, out)
        rows.append((cfg, f, t_sim / t_fp, t_fp, t_sim, rep.seconds))
    print(f"\nMobileNetV2, {args.calib} calibration crops, {args.eval} evaluation crops (other photos), batch 32")
    print(f"{'config':<16} {'top-1':>7} {'top-1 conf':>10} {'top-5':>7} {'SQNR dB':>8} {'KL':>7} "
          f"{'fp32 ms':>8} {'sim ms':>8} {'sim/fp32':>8} {'calib s':>8}")
    for cfg, f, ratio, t_fp, t_sim, cal in rows:
        print(f"{cfg:<16} {f.top1:>7.1%} {f.top1_confident:>10.1%} {f.top5:>7.1%} {f.sqnr_db:>8.2f} {f.kl:>7.3f} "
              f"{t_fp * 1e3:>8.0f} {t_sim * 1e3:>8.0f} {ratio:>8.2f} {cal:>8.1f}")
    print(f"({rows[0][1].n_confident} of {rows[0][1].n} evaluation crops have FP32 top-1 probability >= 0.5)")


if __name__ == "__main__":
    main()
