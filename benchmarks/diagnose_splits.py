"""Where edgequant's W8A8 default loses on a photo partition (issue 18; the notes of ``results/splits.md``).

MobileNetV2, partition ``k`` of ``bench_splits.py`` (128 calibration / 256 evaluation crops, same photos and crop
seeds). Parts:

* ``noise``: logit SQNR of the default (``bn_fold + act_eq + dc_round + bias_correction``), of its weights only (activations
  float) and of its activations only (weights float, no bias correction);
* ``worst``: the activation quantizers that cost most alone (only that one enabled; 128 evaluation crops);
* ``tensor``: quantizer ``--name``'s calibrated range against the float model's per-crop maxima there on
  128 evaluation crops;
* ``methods``: the default with the 8-bit activation range method swapped (``--methods``), activation-aware bias
  correction, and 8-bit AdaRound (``--adaround`` it/layer) before bias correction;
* ``depthwise``: range rules at the equalized depthwise inputs (min-max, the median of per-crop extremes calibrated
  in the pipeline, post-hoc quantiles ``--quantiles`` of the per-crop maxima);
* ``scale``: the default, then quantizer ``--name``'s range top multiplied by each of ``--factors``, scored on the
  evaluation crops and on the calibration crops themselves;
* ``refine``: the default, then for each of ``--names`` in turn the factor of ``--factors`` whose logit SQNR on the
  calibration crops is best is kept (a prototype of a scale-refinement step), scored on the evaluation crops.

    python benchmarks/diagnose_splits.py --partition 4 --part noise|worst|methods|tensor|depthwise|scale
        [--calib 256] [--name features.15.conv.1.2]
"""
from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

STAGES = ["bn_fold", "act_eq", "dc_round", "bias_correction"]
#: MobileNetV2's depthwise inputs (the ReLU6 outputs that ``act_eq`` equalizes)
DEPTHWISE_INPUTS = ["features.0.2"] + [f"features.{i}.conv.0.2" for i in range(2, 18)]


def _data(k: int, n_cal: int = 128):
    from bench_splits import partition

    from edgequant.data.photos import photo_crops

    cal_p, ev_p = partition(k)
    return photo_crops(cal_p, n_cal, seed=2 * k), photo_crops(ev_p, 256, seed=2 * k + 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--partition", type=int, default=4)
    ap.add_argument("--part", choices=["noise", "worst", "tensor", "methods", "depthwise", "scale", "refine"], required=True)
    ap.add_argument("--names", default="x,features.0.2")
    ap.add_argument("--factors", default="0.97,0.98,0.99,0.995,1.0,1.005,1.01")
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--quantiles", default="0.5,0.9,1.0")
    ap.add_argument("--name", default="features.15.conv.1.2")
    ap.add_argument("--methods", default="mse,sqnr,minmax")
    ap.add_argument("--adaround", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(2)
    import edgequant
    from edgequant import QuantConfig
    from edgequant.metrics import fidelity
    from edgequant.models.mobilenet import mobilenet_v2_imagenet
    from edgequant.ptq import correct_bias

    cal, ev = _data(args.partition, args.calib)
    model = mobilenet_v2_imagenet().eval()
    cb = list(cal.split(32))
    with torch.no_grad():
        ref = torch.cat([model(b) for b in ev.split(64)])

    def measure(sim, x=ev, r=ref):
        with torch.no_grad():
            return fidelity(r, torch.cat([sim(b) for b in x.split(64)]))

    def score(sim, x=ev, r=ref):
        f = measure(sim, x, r)
        return f"{f.sqnr_db:.2f} dB, top-1 agreement {f.top1:.3f}, KL {f.kl:.3f}"

    def quantize(cfg="w8a8", stages=STAGES, **kw):
        return edgequant.quantize(copy.deepcopy(model), cb, cfg, ptq=stages, progress=False, **kw).sim

    if args.part == "noise":
        sim = quantize()
        print("default:", score(sim))
        sim.disable(role="activation")
        print("weights only (bias-corrected):", score(sim))
        sim = quantize(stages=["bn_fold", "act_eq"])
        sim.disable(role="weight")
        print("activations only:", score(sim))
    elif args.part == "worst":
        sim = quantize(stages=["bn_fold", "act_eq"])
        acts = [n for n, q in sim.quantizers().items() if q.role != "weight"]
        sim.disable()
        rows = []
        for n in acts:
            sim.enable([n])
            rows.append((score(sim, ev[:128], ref[:128]), n))
            sim.disable([n])
        for s, n in sorted(rows, key=lambda r: float(r[0].split()[0]))[:10]:
            print(f"{n}: {s}")
    elif args.part == "tensor":
        sim = quantize(stages=["bn_fold", "act_eq"])
        q = sim.quantizers()[args.name]
        seen = []  # the float model's tensor there (the output of the module of that name)
        h = model.get_submodule(args.name).register_forward_hook(lambda m, a, y: seen.append(y.detach().flatten(1).amax(1)))
        with torch.no_grad():
            model(ev[:128])
        h.remove()
        peaks = torch.cat(seen)
        top = float(q.scale.max()) * q.qmax
        print(f"{args.name}: calibrated range top {top:.2f}; evaluation per-crop maxima median {peaks.median():.2f}, "
              f"90th percentile {peaks.quantile(0.9):.2f}, max {peaks.max():.2f}")
    elif args.part in ("scale", "refine"):
        sim = quantize()
        with torch.no_grad():
            cref = torch.cat([model(b) for b in cal.split(64)])
        factors = [float(v) for v in args.factors.split(",")]
        if args.part == "scale":
            q = sim.quantizers()[args.name]
            top = float(q.scale.reshape(-1)[0]) * (q.qmax - float(q.zero_point.reshape(-1)[0]))
            for f in _scaled(q, factors):
                print(f"{args.name} top {top * f:.3f} (x{f}): evaluation {score(sim)}; calibration crops {score(sim, cal, cref)}")
        else:
            print("default:", score(sim))
            for name in args.names.split(","):
                q = sim.quantizers()[name]
                tried = [(measure(sim, cal, cref).sqnr_db, f) for f in _scaled(q, factors)]
                best = max(tried)
                q._set(q.scale.detach() * best[1], q.zero_point)
                print(f"{name}: x{best[1]} ({', '.join(f'x{f} {v:.2f}' for v, f in tried)} dB on calibration crops)")
            print("refined:", score(sim))
    elif args.part == "depthwise":
        cfg = QuantConfig.preset("w8a8")
        minmax = edgequant.Override(activation=replace(cfg.activation, range_method="minmax"))
        print("min-max at the depthwise inputs:", score(quantize(replace(cfg, module_names={n: minmax for n in DEPTHWISE_INPUTS}))))
        median = edgequant.Override(activation=replace(cfg.activation, range_method="median_minmax"))
        print("median of per-crop extremes at the depthwise inputs (calibrated in the pipeline):",
              score(quantize(replace(cfg, module_names={n: median for n in DEPTHWISE_INPUTS}))))
        sim = quantize()
        print("default:", score(sim))
        for q in _reset_depthwise_ranges(sim, cb, [float(v) for v in args.quantiles.split(",")]):
            print(f"depthwise-input ranges reset to quantile {q} of the per-crop maxima:", score(sim))
    else:
        print("default:", score(quantize()))
        for m in args.methods.split(","):
            cfg = QuantConfig.preset("w8a8")
            cfg = replace(cfg, activation=replace(cfg.activation, range_method=m))
            print(f"activation ranges {m}:", score(quantize(cfg)))
        sim = quantize(stages=["bn_fold", "act_eq"])
        correct_bias(sim, cb, activations="quantized", progress=False)
        print("bias correction of activation shifts too:", score(sim))
        print(f"8-bit AdaRound ({args.adaround} it) before bias correction:",
              score(quantize(stages=["bn_fold", "act_eq", "adaround", "bias_correction"], adaround_iterations=args.adaround)))


def _scaled(q, factors):
    """Set quantizer ``q``'s scale to each factor times its own in turn (yielding the factor); restore it after."""
    s0 = q.scale.detach().clone()
    try:
        for f in factors:
            q._set(s0 * f, q.zero_point)
            yield f
    finally:
        q._set(s0, q.zero_point)


def _reset_depthwise_ranges(sim, batches, quantiles):
    """For each quantile in turn: set every ``DEPTHWISE_INPUTS`` quantizer's range to that quantile of the per-crop
    maxima of its input on ``batches`` (collected once, upstream quantizers on), then yield it."""
    quant = sim.quantizers()
    maxima = {n: [] for n in DEPTHWISE_INPUTS}
    hooks = [quant[n].register_forward_pre_hook(lambda m, a, n=n: maxima[n].append(a[0].detach().flatten(1).amax(1)))
             for n in DEPTHWISE_INPUTS]
    with torch.no_grad():
        for b in batches:
            sim(b)
    for h in hooks:
        h.remove()
    peaks = {n: torch.cat(v) for n, v in maxima.items()}
    for q in quantiles:
        for n, p in peaks.items():
            qz = quant[n]
            qz._set((torch.quantile(p, q) / qz.qmax).reshape(qz.scale.shape).to(qz.scale.dtype), qz.zero_point)
        yield q


if __name__ == "__main__":
    main()
