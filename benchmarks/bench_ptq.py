"""Post-training quantization on real models, one table, the same inputs for every row.

1. Real MobileNetV2 (ImageNet weights), per-tensor W8A8 after BN folding: naive vs CLE, + high-bias
   absorption, + bias correction (empirical / analytical).
2. Real MobileNetV2, W4A8 per-channel: AdaRound vs nearest rounding, with wall time.
3. Labelled: a MobileNetV2-style network trained here (fixed seed) on MNIST-5k (80/20 split):
   FP32 vs W8A8 and W4A8 (nearest / AdaRound) accuracy on the held-out digits.
4. Data-free: MobileNetV2 W8A8 with no data (BN-based ranges + CLE + analytical bias correction).

Fidelity is against FP32 on evaluation crops from photos disjoint from the calibration photos.
Usage: python benchmarks/bench_ptq.py [--calib 128] [--eval 256] [--adaround-iterations 200] [--out FILE.md]
"""
from __future__ import annotations

import argparse
import copy
import os
import time
import warnings

import torch

from edgequant import QuantSim
from edgequant.analysis import fidelity
from edgequant.data import calibration_crops, evaluation_crops
from edgequant.data.mnist import mnist_5k
from edgequant.models import mobilenet_v2_imagenet
from edgequant.models.mnist_net import train_mnist_net
from edgequant.ptq import (adaround, correct_bias, correct_bias_analytical, cross_layer_equalization, fold_batch_norms,
                           set_bn_ranges)

IMAGENET_INPUT_RANGE = ((0 - 0.485) / 0.229, (1 - 0.406) / 0.225)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval", type=int, default=256)
    ap.add_argument("--adaround-iterations", type=int, default=200)
    ap.add_argument("--mnist-epochs", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    rows = []
    t_all = time.perf_counter()

    model = mobilenet_v2_imagenet().eval()
    cal, ev = calibration_crops(args.calib), evaluation_crops(args.eval)
    cb, eb = list(cal.split(32)), list(ev.split(64))
    with torch.no_grad():
        ref = torch.cat([model(b) for b in eb])

    def row(group, name, sim, seconds, note=""):
        with torch.no_grad():
            out = torch.cat([sim(b) for b in eb])
        f = fidelity(ref, out)
        rows.append((group, name, f"{f.top1:.3f}", f"{f.top1_confident:.3f}", f"{f.sqnr_db:.2f}", f"{f.kl:.3f}", "",
                     f"{seconds:.1f}", note))
        print(" | ".join(rows[-1]), flush=True)

    def sim_of(m, cfg, calibrate=True):
        t = time.perf_counter()
        s = QuantSim(m, cal[:1], cfg)
        if calibrate:
            s.calibrate(cb, progress=False)
        return s, time.perf_counter() - t

    # 1. per-tensor W8A8
    g = "1 MobileNetV2 W8A8 per-tensor"
    folded, _ = fold_batch_norms(model)
    s, t = sim_of(folded, "w8a8_per_tensor")
    row(g, "naive (BN folded)", s, t)
    t0 = time.perf_counter()
    eq, rep = cross_layer_equalization(model, cal[:32], absorb_high_bias=False)
    t_cle = time.perf_counter() - t0
    s, t = sim_of(eq, "w8a8_per_tensor")
    row(g, "CLE", s, t + t_cle, f"{len(rep.pairs)} pairs, float SQNR {rep.sqnr_db_scaling:.0f} dB")
    t0 = time.perf_counter()
    eqh, rep = cross_layer_equalization(model, cal[:32])
    t_cle = time.perf_counter() - t0
    s, t = sim_of(eqh, "w8a8_per_tensor")
    row(g, "CLE + HBA", s, t + t_cle, f"float SQNR after absorption {rep.sqnr_db_absorption:.1f} dB")
    s2 = copy.deepcopy(s)
    t0 = time.perf_counter()
    correct_bias(s, cb, measure=False, progress=False)
    row(g, "CLE + HBA + BC (empirical)", s, t + t_cle + time.perf_counter() - t0)
    t0 = time.perf_counter()
    correct_bias_analytical(s2)
    row(g, "CLE + HBA + BC (analytical)", s2, t + t_cle + time.perf_counter() - t0)

    # 2. W4A8 per-channel
    g = "2 MobileNetV2 W4A8 per-channel"
    s, t = sim_of(folded, "w4a8")
    row(g, "nearest", s, t)
    t0 = time.perf_counter()
    rep = adaround(s, cb, iterations=args.adaround_iterations, progress=False)
    row(g, f"AdaRound ({args.adaround_iterations} it/layer)", s, t + time.perf_counter() - t0,
        f"AdaRound alone {rep.seconds:.0f} s for {len(rep.layers)} layers")

    # 4. data-free W8A8
    g = "4 MobileNetV2 W8A8, no data"
    for cfg in ("w8a8_per_tensor", "w8a8"):
        t0 = time.perf_counter()
        s = QuantSim(eqh, cal[:1], cfg)
        set_bn_ranges(s, input_ranges={"x": IMAGENET_INPUT_RANGE}, input_stats={"x": (0.0, 1.0)})
        correct_bias_analytical(s, input_stats={"x": (0.0, 1.0)})
        row(g, f"{cfg}: BN ranges + CLE + HBA + analytical BC", s, t_cle + time.perf_counter() - t0)

    # 3. MNIST
    g = "3 MNIST-5k MobileNetV2-style (accuracy)"
    xtr, ytr, xte, yte = mnist_5k()
    t0 = time.perf_counter()
    net = train_mnist_net(xtr, ytr, epochs=args.mnist_epochs)
    t_train = time.perf_counter() - t0

    def acc(m):
        with torch.no_grad():
            return float((torch.cat([m(b) for b in xte.split(250)]).argmax(1) == yte).float().mean())

    fp = acc(net)
    rows.append((g, "FP32", "", "", "", "", f"{fp:.4f}", f"{t_train:.1f}", "training time"))
    mcal = list(xtr[:512].split(64))
    mfold, _ = fold_batch_norms(net)
    for cfg in ("w8a8", "w4a8"):
        t0 = time.perf_counter()
        s = QuantSim(mfold, xtr[:1], cfg)
        s.calibrate(mcal, progress=False)
        a = acc(s)
        rows.append((g, f"{cfg} nearest", "", "", "", "", f"{a:.4f}", f"{time.perf_counter() - t0:.1f}", f"drop {100 * (fp - a):.2f} pts"))
        print(" | ".join(rows[-1]), flush=True)
    t0 = time.perf_counter()
    adaround(s, mcal, iterations=args.adaround_iterations * 2, progress=False)
    a = acc(s)
    rows.append((g, f"w4a8 AdaRound ({args.adaround_iterations * 2} it/layer)", "", "", "", "", f"{a:.4f}",
                 f"{time.perf_counter() - t0:.1f}", f"drop {100 * (fp - a):.2f} pts"))
    print(" | ".join(rows[-1]), flush=True)

    head = ("group", "method", "top-1 agr", "top-1 agr (conf)", "SQNR dB", "KL", "accuracy", "seconds", "note")
    lines = [f"calibration {args.calib} crops, evaluation {args.eval} crops (other photos); torch threads "
             f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}; total {time.perf_counter() - t_all:.0f} s", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        from edgequant.io.encodings import atomic_write_text

        atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
