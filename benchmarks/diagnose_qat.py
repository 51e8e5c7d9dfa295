"""Why MobileNetV2 W4A8 QAT stalls on the held-out photos (issue 11; the notes of ``results/qat.md``).

The same AdaRound start as ``bench_qat.py --part mobilenet`` (200 it/layer on the 128 calibration crops; cached in
``--start``), then distillation QAT for ``--steps`` with a hand-written loop that can add two things ``finetune``
does not do:

* ``--feature-weight W``: feature distillation, the mean over every activation quantizer of the MSE between the
  student's quantized tensor and the float model's tensor there (normalised by the latter's variance), times ``W``,
  added to the KL on the logits. The float tensors come from a second sim of the same float model with every
  quantizer off, so both sides are named alike.
* ``--train-photos evaluation``: training crops of the *evaluation* photos (other crop seeds than the evaluation
  crops'): the ceiling a perfectly matched training set would give, not a recipe.

Evaluated on the 256 held-out crops (top-1 agreement, SQNR, KL against FP32) every ``--eval-every`` steps.

    python benchmarks/diagnose_qat.py --steps 100 --lr 1e-4 --feature-weight 1
    python benchmarks/diagnose_qat.py --steps 100 --lr 1e-4 --train-photos evaluation
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _start(model, cal, cfg, folder: Path):
    import edgequant

    if (folder / "manifest.json").exists():  # written by sim.save
        return edgequant.load(folder)
    sim = edgequant.quantize(model, list(cal.split(32)), cfg, ptq=["bn_fold", "adaround"], adaround_iterations=200,
                             progress=False).sim
    sim.save(folder)
    return sim


def _tap(sim, names, store: dict, include_disabled: bool):
    """Forward hooks that keep the output of each quantizer slot in ``names`` (enabled or not) in ``store``."""
    def hook(name):
        def h(_m, _i, out):
            store[name] = out
        return h
    slots = {n: c[k] for n, c, k, _ in sim._slots()} if include_disabled else sim.quantizers()
    for n in names:
        slots[n].register_forward_hook(hook(n))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--quantizer-lr", type=float, default=1e-5)
    ap.add_argument("--feature-weight", type=float, default=0.0)
    ap.add_argument("--train-photos", choices=["calibration", "evaluation"], default="calibration")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--start", default=".peers/qat/w4a8_adaround_start", help="folder caching the AdaRound start")
    ap.add_argument("--out", default=None, help="the curve as JSON")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from bench_qat import _config, _training_batch

    from edgequant import QuantSim
    from edgequant.data import calibration_crops, evaluation_crops
    from edgequant.data.photos import EVALUATION_PHOTOS, photo_crops
    from edgequant.metrics import fidelity
    from edgequant.models import mobilenet_v2_imagenet
    from edgequant.qat import prepare_qat, project_
    from edgequant.qat.finetune import _optimizer, _train_mode

    model = mobilenet_v2_imagenet().eval()
    cal, ev = calibration_crops(128), evaluation_crops(256, seed=1)
    with torch.no_grad():
        ref = torch.cat([model(b) for b in ev.split(64)])
    cfg = _config(4, 8)
    sim = _start(model, cal, cfg, Path(args.start))
    teacher = QuantSim(model, cal[:2], cfg)  # the same capture, every quantizer off: the float tensors by name
    teacher.disable()
    teacher.eval()

    def evaluate(step, seconds):
        sim.eval()
        with torch.no_grad():
            f = fidelity(ref, torch.cat([sim(b) for b in ev.split(64)]))
        curve.append({"step": step, "seconds": seconds, "top1": f.top1, "sqnr_db": f.sqnr_db, "kl": f.kl})
        print(json.dumps(curve[-1]), flush=True)

    curve: list[dict] = []
    evaluate(0, 0.0)
    prepare_qat(sim)
    names = [n for n, q in sim.quantizers().items() if q.role != "weight"]
    st, te = {}, {}
    _tap(sim, names, st, include_disabled=False)
    _tap(teacher, names, te, include_disabled=True)
    opt = _optimizer(sim, args.lr, args.quantizer_lr, 0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / args.steps)))
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        if args.train_photos == "evaluation":
            x = photo_crops(EVALUATION_PHOTOS, args.batch, seed=10_000 + step - 1)
        else:
            x = _training_batch(argparse.Namespace(batch=args.batch, mosaic=False), step - 1)
        st.clear()
        te.clear()
        with torch.no_grad():
            target = teacher(x)
        _train_mode(sim, False)
        opt.zero_grad(set_to_none=True)
        out = sim(x)
        loss = F.kl_div(F.log_softmax(out, 1), F.log_softmax(target, 1), log_target=True, reduction="batchmean")
        if args.feature_weight > 0:
            common = [n for n in names if n in st and n in te]
            feat = sum(F.mse_loss(st[n], te[n]) / (te[n].var() + 1e-8) for n in common) / len(common)
            loss = loss + args.feature_weight * feat
        loss.backward()
        opt.step()
        sched.step()
        project_(sim)
        if step % args.eval_every == 0 or step == args.steps:
            evaluate(step, time.perf_counter() - t0)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "curve": curve}, indent=1))


if __name__ == "__main__":
    main()
