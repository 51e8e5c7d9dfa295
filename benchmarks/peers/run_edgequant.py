"""edgequant's rows of the peer benchmark (runs in the project's own environment)."""
from __future__ import annotations

import copy
import dataclasses

from common import Data, Recorder, main_args, timed

import edgequant
from edgequant import QuantConfig, QuantSim
from edgequant.ptq import adaround, correct_bias, cross_layer_equalization, fold_batch_norms


def main():
    args = main_args()
    data = Data(args.data)
    rec = Recorder("edgequant", edgequant.__version__, args.out, data)
    model, mnist = data.mobilenet(), data.mnist_net()
    cb, mcb = data.cal_batches(), data.mnist_cal_batches()
    its = args.adaround_iterations or 200

    def sim_pair(prepare, cfg, post=None):
        """The same recipe on MobileNetV2 and on the MNIST net; times the MobileNetV2 one."""
        def one(m, batches):
            def go():
                fm = prepare(m, batches)
                sim = QuantSim(fm, batches[0][:1], cfg)
                sim.calibrate(batches, progress=False)
                if post is not None:
                    post(sim, batches)
                return sim
            return timed(go)
        sim, t = one(model, cb)
        msim, mt = one(mnist, mcb) if mnist is not None else (None, None)
        return dict(seconds=t, imagenet=sim, fp32=model, mnist=msim, mnist_seconds=mt)

    def recipe(stages, cfg="w8a8"):
        """``edgequant.quantize`` with a fixed list of stages (every batch calibrates, nothing is scored)."""
        def run():
            q = lambda m, b: timed(lambda: edgequant.quantize(copy.deepcopy(m), b, cfg, ptq=stages, progress=False))  # noqa: E731
            (res, t), (mres, mt) = q(model, cb), (q(mnist, mcb) if mnist is not None else (None, None))
            return dict(seconds=t, imagenet=res.sim, fp32=model, mnist=mres.sim if mres else None, mnist_seconds=mt)
        return run

    fold = lambda m, b: fold_batch_norms(m)[0]  # noqa: E731
    keep_bn = lambda m, b: m  # noqa: E731  (weights quantized before the BN, as NNCF and the demo do)
    cle = lambda m, b: cross_layer_equalization(m, b[0])[0]  # noqa: E731 (BN fold, CLE, high-bias absorption)
    bc = lambda sim, b: correct_bias(sim, b, measure=False, progress=False)  # noqa: E731
    ada = lambda sim, b: adaround(sim, b, iterations=its, progress=False)  # noqa: E731
    pt_mse = _weight_ranges("w8a8_per_tensor", "mse")
    w4_sqnr = _weight_ranges("w4a8", "sqnr")
    todo = {
        "w8a8_pc": [("BN fold + calibrate (no other PTQ)", lambda: sim_pair(fold, "w8a8")),
                    ("BN fold + activation equalization + first-layer sum rounding + bias correction",
                     recipe(["bn_fold", "act_eq", "dc_round", "bias_correction"]))],
        "w8a8_pt": [("BN fold + calibrate", lambda: sim_pair(fold, "w8a8_per_tensor")),
                    ("calibrate, BN kept after the quantized conv", lambda: sim_pair(keep_bn, "w8a8_per_tensor")),
                    ("calibrate (MSE weight ranges), BN kept after the quantized conv", lambda: sim_pair(keep_bn, pt_mse))],
        "w8a8_pt_cle": ("CLE + high-bias absorption + empirical bias correction", lambda: sim_pair(cle, "w8a8_per_tensor", bc)),
        "w4a8_nearest": [("BN fold + calibrate (MSE weight ranges)", lambda: sim_pair(fold, "w4a8")),
                         ("BN fold + calibrate (SQNR weight ranges, AIMET's tf_enhanced criterion)",
                          lambda: sim_pair(fold, w4_sqnr))],
        "w4a8_adaround": (f"AdaRound, {its} iterations/layer", lambda: sim_pair(fold, "w4a8", ada)),
        "best": ("edgequant.quantize(model, data, 'w8a8', ptq='auto')", lambda: _best(model, mnist, cb, mcb)),
    }
    for row in args.rows:
        entries = todo.get(row, [])
        for method, run in entries if isinstance(entries, list) else [entries]:
            twice(rec, row, method, run)


def _weight_ranges(preset: str, method: str) -> QuantConfig:
    """``preset`` with its weight range method replaced by ``method``."""
    cfg = QuantConfig.preset(preset)
    return dataclasses.replace(cfg, weight=dataclasses.replace(cfg.weight, range_method=method))


def twice(rec, row, method, run):
    """Record the recipe as is, then the same sims with the model output left at accumulator precision
    (torchao PT2E and NNCF do not quantize the model output; AIMET and ONNX Runtime do)."""
    done = {}

    def first():
        done["r"] = run()
        return done["r"]

    def second():
        r = dict(done["r"])
        for key in ("imagenet", "mnist"):
            if r.get(key) is not None:
                r[key].disable(r[key].output_quantizers())
        r["note"] = "the same sims, model output not quantized"
        return r

    rec.row(row, method, first)
    if "r" in done:
        rec.row(row, method + "; output in float", second)


def _best(model, mnist, cb, mcb):
    res, t = timed(lambda: edgequant.quantize(copy.deepcopy(model), cb, "w8a8", ptq="auto", progress=False))
    mres, mt = timed(lambda: edgequant.quantize(copy.deepcopy(mnist), mcb, "w8a8", ptq="auto", progress=False)) \
        if mnist is not None else (None, None)
    kept = ", ".join(s.name for s in res.report.stages if s.kept)
    return dict(seconds=t, imagenet=res.sim, fp32=model, mnist=mres.sim if mres else None, mnist_seconds=mt,
                note=f"stages kept: {kept}")


if __name__ == "__main__":
    main()
