"""Quantization-aware training: what it recovers over PTQ, and what a step costs.

Parts (``--part``, each writes ``.peers/qat/<part>.json``; the table ``benchmarks/results/qat.md`` is
rebuilt from all parts present after every run):

* ``mnist``: the project's MNIST-5k network (trained here, fixed seed) at W4A4, W3A3 and W2A8: FP32,
  the one-call PTQ (``edgequant.quantize(ptq="auto")``: AdaRound at these widths), then QAT from it
  (LSQ+ grids) with labels (cross-entropy) and without (distillation from FP32), held-out accuracy.
* ``mobilenet``: real MobileNetV2 (ImageNet weights) at W4A8 per-channel and W4A4: AdaRound start
  (200 it/layer, 128 calibration crops), then QAT by distillation from FP32 on fresh crops of the
  calibration photos (never the evaluation photos), evaluated on held-out photos every ``--eval-every``
  steps: top-1 agreement, SQNR, KL against FP32, with training wall time.
* ``cost``: time per training step and peak memory of the QAT sim vs the FP32 model (BN in training),
  MobileNetV2 at batch 32, each measured in a fresh process.
* ``peers``: AIMET (QuantSim with range learning) and Brevitas QAT on the same MNIST-5k network at W4A4, each in its
  own environment (``peers/run_qat_aimet.py``, ``peers/run_qat_brevitas.py``): ranges set on the same 512 training
  digits, held-out accuracy before (their PTQ) and after QAT with labels over the same batches of 64, in order, for
  the step budget of the ``mnist`` part's W4A4 labels row (``--mnist-epochs`` passes); Adam lr 1e-3 with the cosine
  schedule ``finetune`` uses.
* ``peers_mobilenet``: AIMET and Brevitas QAT on real MobileNetV2 (ImageNet weights) at W4A8 (4-bit per-channel
  symmetric weights, 8-bit activations, model input and logits 8-bit), each in its own environment (the same runners,
  ``--model mobilenet``): ranges from the same 128 calibration crops, then distillation from FP32 (no labels) over
  exactly the ``mobilenet`` part's training batches (``--steps`` batches of ``--batch`` crops, in order), Adam lr
  ``--lr`` on every trainable parameter with the cosine schedule ``finetune`` uses, dropout off; top-1 agreement, SQNR
  and KL against FP32 on the same held-out crops before (the peer's PTQ) and after. It does not rewrite ``qat.md``
  (hand-kept sections): it prints its section and writes it to ``.peers/qat/peers_mobilenet.md``.

Usage: python benchmarks/bench_qat.py --part mnist|mobilenet|cost|bn|peers|peers_mobilenet|table [--steps 300] [--eval-seed 1]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / ".peers" / "qat"


def _config(w_bits: int, a_bits: int, io=("x", "classifier", "classifier.*")):
    """W{w}A{a} with MSE activation ranges below 8 bits; the model input and the logits stay on 8-bit grids
    (first and last layer at 8 bits, as in the LSQ paper's W4A4 and W3A3)."""
    from edgequant import Override, QuantConfig

    base = QuantConfig.preset("w4a8")
    act = replace(base.activation, bits=a_bits, range_method="mse" if a_bits < 8 else base.activation.range_method)
    names = {n: Override(activation=base.activation) for n in io} if a_bits < 8 else {}
    return replace(base, weight=replace(base.weight, bits=w_bits), activation=act, module_names=names)


def _save(part: str, rows) -> None:
    STORE.mkdir(parents=True, exist_ok=True)
    (STORE / f"{part}.json").write_text(json.dumps(rows, indent=1))


def _mnist_setup():
    """``(xtr, ytr, xte, yte, net, acc)``: MNIST-5k, the project's network trained on it (8 epochs) and
    ``acc(model)``, held-out accuracy."""
    from edgequant.data.mnist import mnist_5k
    from edgequant.models.mnist_net import train_mnist_net

    xtr, ytr, xte, yte = mnist_5k()
    net = train_mnist_net(xtr, ytr, epochs=8)

    def acc(m):
        with torch.no_grad():
            return float(torch.cat([m(b).argmax(1) for b in xte.split(256)]).eq(yte).float().mean())
    return xtr, ytr, xte, yte, net, acc


def part_mnist(args) -> list:
    from edgequant import quantize
    from edgequant.qat import finetune, prepare_qat

    xtr, ytr, xte, yte, net, acc = _mnist_setup()
    fp32 = acc(net)
    rows = []
    cal = list(xtr[:512].split(64))
    labelled = [(xtr[i:i + 64], ytr[i:i + 64]) for i in range(0, len(xtr), 64)]
    for w, a in ((4, 4), (3, 3), (2, 8)):
        t = time.perf_counter()
        res = quantize(net, cal, _config(w, a), ptq="auto", adaround_iterations=400, progress=False)
        row = {"config": f"W{w}A{a}", "fp32": fp32, "ptq": acc(res.sim), "ptq_s": time.perf_counter() - t,
               "stages": [s.name for s in res.report.stages if s.kept]}
        for mode in ("labels", "distill"):
            torch.manual_seed(0)
            sim = copy.deepcopy(res.sim)
            prepare_qat(sim)
            t = time.perf_counter()
            if mode == "labels":
                rep = finetune(sim, labelled, epochs=args.mnist_epochs, lr=1e-3, progress=False,
                               loss=lambda out, b: F.cross_entropy(out, b[1]))
            else:
                rep = finetune(sim, [b for b, _ in labelled], epochs=args.mnist_epochs, lr=1e-3, teacher=net, progress=False)
            row[f"qat_{mode}"], row[f"qat_{mode}_s"], row["qat_steps"] = acc(sim), time.perf_counter() - t, rep.steps
        rows.append(row)
        print(row, flush=True)
    return rows


def part_bn(args) -> list:
    """The two batch-norm schemes of QAT on the MNIST-5k network (it has a BatchNorm after every conv): static
    folding (the sim's default) and BN kept in training (``qat.simulate_bn_folding``, statistics frozen after
    half the steps), both from the same calibrated start, distillation without labels; two seeds (data order
    and initialisation of the learned grids). Written to ``benchmarks/results/qat_bn.md``."""
    from edgequant import QuantSim
    from edgequant.qat import finetune, fold_simulated_bn, prepare_qat, simulate_bn_folding

    xtr, ytr, xte, yte, net, acc = _mnist_setup()
    cal = list(xtr[:512].split(64))
    rows = [{"scheme": "FP32", "acc": acc(net)}]
    steps = args.mnist_epochs * (len(xtr) // 64)
    for w, a in ((4, 4), (3, 3)):
        for seed in (0, 1):
            for scheme in ("static folding", "BN in training"):
                torch.manual_seed(seed)
                order = torch.randperm(len(xtr))
                batches = [xtr[order[i:i + 64]] for i in range(0, len(xtr) - 63, 64)]
                sim = QuantSim(net, cal[0][:1], _config(w, a), fold_bn=scheme == "static folding")
                if scheme == "BN in training":
                    simulate_bn_folding(sim, freeze_bn_after=steps // 2)
                sim.calibrate(cal, progress=False)
                start = acc(sim)
                prepare_qat(sim)
                t = time.perf_counter()
                finetune(sim, batches, steps=steps, lr=1e-3, teacher=net, progress=False)
                sec = time.perf_counter() - t
                if scheme == "BN in training":
                    sim.eval()
                    fold_simulated_bn(sim)
                row = {"config": f"W{w}A{a}", "scheme": scheme, "seed": seed, "start": start, "acc": acc(sim),
                       "steps": steps, "seconds": sec}
                rows.append(row)
                print(row, flush=True)
    return rows


def bn_table(rows) -> str:
    out = ["# QAT: static BN folding vs BN kept in training", "",
           "Generated by `python benchmarks/bench_qat.py --part bn` (2 CPU threads). MNIST-5k network (a BatchNorm after "
           "every conv), held-out accuracy; both schemes start from the same calibration (no PTQ stages), then "
           "`prepare_qat` (LSQ+) + `finetune` by distillation from FP32 without labels (Adam lr 1e-3, cosine). "
           "BN in training: `qat.simulate_bn_folding(sim, freeze_bn_after=steps // 2)` on a `fold_bn=False` sim, "
           "folded for good (`qat.fold_simulated_bn`) before the evaluation.", "",
           f"FP32: {rows[0]['acc']:.4f}", "",
           "| config | scheme | seed | calibrated start | after QAT | steps | training s |", "|---|---|---|---|---|---|---|"]
    out += [f"| {r['config']} | {r['scheme']} | {r['seed']} | {r['start']:.4f} | {r['acc']:.4f} | {r['steps']} | "
            f"{r['seconds']:.0f} |" for r in rows[1:]]
    return "\n".join(out) + "\n"


def part_mobilenet(args) -> list:
    from edgequant import quantize
    from edgequant.data import calibration_crops, evaluation_crops
    from edgequant.metrics import fidelity
    from edgequant.models import mobilenet_v2_imagenet
    from edgequant.qat import finetune, prepare_qat

    model = mobilenet_v2_imagenet().eval()
    cal = calibration_crops(128)
    ev = evaluation_crops(args.eval, seed=args.eval_seed)
    with torch.no_grad():
        ref = torch.cat([model(b) for b in ev.split(64)])
    # fresh crops of the calibration photos, a new set per batch (seeds away from the calibration crops')
    train = [_training_batch(args, i) for i in range(args.steps)]
    rows = []
    for w, a in [tuple(int(v) for v in c.lower().lstrip("w").split("a")) for c in args.configs.split(",")]:
        t = time.perf_counter()
        sim = quantize(model, list(cal.split(32)), _config(w, a), ptq=["bn_fold", "adaround"],
                       adaround_iterations=200, progress=False).sim
        start_s = time.perf_counter() - t
        curve = []

        def evaluate(s):
            with torch.no_grad():
                f = fidelity(ref, torch.cat([s(b) for b in ev.split(64)]))
            curve.append({"top1": f.top1, "sqnr_db": f.sqnr_db, "kl": f.kl})
            return f.top1

        evaluate(sim)
        prepare_qat(sim)
        rep = finetune(sim, train, steps=args.steps, lr=args.lr, quantizer_lr=args.quantizer_lr, teacher=model, eval_fn=evaluate,
                       eval_every=args.eval_every, progress=True)
        steps = [0] + [s for s, _ in rep.evals]
        secs = [0.0] + [rep.seconds[s - 1] for s in steps[1:]]
        row = {"config": f"W{w}A{a}", "adaround_s": start_s, "mosaic": args.mosaic, "lr": args.lr, "quantizer_lr": args.quantizer_lr, "batch": args.batch, "eval_seed": args.eval_seed,
               "curve": [dict(c, step=s, seconds=sec) for c, s, sec in zip(curve, steps, secs)]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _training_batch(args, i: int) -> torch.Tensor:
    """Batch ``i`` of fresh crops of the calibration photos; with ``--mosaic`` half of it 2x2 mosaics of half-size crops
    of four different photos (new layouts and scales from the same few photos)."""
    from edgequant.data.photos import CALIBRATION_PHOTOS, photo_crops

    if not args.mosaic:
        return photo_crops(CALIBRATION_PHOTOS, args.batch, seed=10_000 + i)
    half = args.batch // 2
    whole = photo_crops(CALIBRATION_PHOTOS, args.batch - half, seed=10_000 + i)
    tiles = photo_crops(CALIBRATION_PHOTOS, 4 * half, size=112, seed=20_000 + i).view(half, 4, 3, 112, 112)
    rows = [torch.cat([tiles[:, 0], tiles[:, 1]], -1), torch.cat([tiles[:, 2], tiles[:, 3]], -1)]
    return torch.cat([whole, torch.cat(rows, -2)])


def _cost_child(kind: str, batch: int) -> dict:
    """One measurement in this (fresh) process: seconds per step and peak RSS growth."""
    import resource

    from edgequant import QuantSim
    from edgequant.data import calibration_crops
    from edgequant.models import mobilenet_v2_imagenet
    from edgequant.qat import distillation_loss, prepare_qat

    model = mobilenet_v2_imagenet().eval()
    x = calibration_crops(batch, seed=5)
    with torch.no_grad():
        target = model(x)
    net = model
    if kind == "sim":
        net = QuantSim(model, x[:1], _config(4, 8))
        net.calibrate([x], progress=False)
        prepare_qat(net)
    net.train()
    opt = torch.optim.Adam(net.parameters(), 1e-6)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(5):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        distillation_loss(net(x), target).backward()
        opt.step()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": kind, "step_s": sorted(times[1:])[1], "peak_growth_mb": (peak - base) / 1024}


def part_cost(args) -> list:
    rows = []
    for _ in range(2):  # alternate, twice, so that a slow moment hits both
        for kind in ("fp32", "sim"):
            out = subprocess.run([sys.executable, __file__, "--cost-child", kind, "--batch", str(args.batch)],
                                 capture_output=True, text=True, check=True, env=dict(os.environ))
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    return rows


def part_peers(args) -> list:
    """AIMET and Brevitas QAT on the MNIST-5k network, each runner in its peer's environment, with the step budget of
    the ``mnist`` part's labels rows (``--mnist-epochs`` passes over the batches of 64)."""
    xtr, ytr, xte, yte, net, acc = _mnist_setup()
    steps = args.mnist_epochs * ((len(xtr) + 63) // 64)  # finetune(labelled, epochs=...): len(labelled) per pass
    fp32 = acc(net)
    STORE.mkdir(parents=True, exist_ok=True)
    inputs = STORE / "peers_inputs.pt"
    torch.save({"state_dict": net.state_dict(), "train_x": xtr, "train_y": ytr, "calib_x": xtr[:512],
                "test_x": xte, "test_y": yte, "fp32_acc": fp32}, inputs)
    rows = []
    for peer in ("aimet", "brevitas"):
        got = _run_peer_runner(peer, inputs, STORE / f"peers_{peer}.json", ["--steps", str(steps), "--lr", "1e-3"],
                               {"config": "W4A4", "steps": steps}, args.peer_timeout)
        rows += [dict(r, fp32=fp32) for r in got]
    return rows


def _run_peer_runner(peer: str, inputs: Path, out: Path, options: list, error_row: dict, timeout: int) -> list:
    """Run ``peers/run_qat_{peer}.py inputs out *options`` in the peer's environment (``EDGEQUANT_BENCH_THREADS``
    threads); returns its rows, plus an error row (``error_row`` with the error) when it fails or times out."""
    import bench_peers

    threads = os.environ.get("EDGEQUANT_BENCH_THREADS", "2")
    out.unlink(missing_ok=True)
    try:
        py = bench_peers.ensure_env(peer)
        subprocess.run([str(py), str(ROOT / "benchmarks" / "peers" / f"run_qat_{peer}.py"), str(inputs), str(out),
                        *options, "--threads", threads], check=True, timeout=timeout,
                       env=dict(os.environ, OMP_NUM_THREADS=threads, PYTHONPATH=str(ROOT / "benchmarks" / "peers")))
        got = json.loads(out.read_text())
    except (OSError, ValueError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        got = json.loads(out.read_text()) if out.exists() else []  # the rows it finished before failing
        got.append(dict(error_row, peer=peer, method="-", error=f"{type(e).__name__}: {' '.join(str(e).split())}"[:400]))
        out.write_text(json.dumps(got, indent=1))
    print(json.dumps(got), flush=True)
    return got


def part_peers_mobilenet(args) -> list:
    """AIMET and Brevitas distillation QAT on MobileNetV2 at W4A8, each runner (``--model mobilenet``) in its peer's
    environment, on the inputs of the ``mobilenet`` part: its 128 calibration crops, its training batches
    (``_training_batch(args, i)`` for ``i < --steps``, no mosaics) and its held-out crops with their FP32 logits; and
    edgequant (``edgequant`` in ``--peers``) in this process on the same inputs. Each peer's rows go to
    ``peers_mobilenet_{peer}.json``, so one peer can be rerun alone."""
    from edgequant.data import calibration_crops, evaluation_crops
    from edgequant.models import mobilenet_v2_imagenet

    if args.mosaic:
        raise SystemExit("--part peers_mobilenet uses the plain training batches (no --mosaic)")
    model = mobilenet_v2_imagenet().eval()
    ev = evaluation_crops(args.eval, seed=args.eval_seed)
    with torch.no_grad():
        ref = torch.cat([model(b) for b in ev.split(64)])
    cal, train = calibration_crops(128), [_training_batch(args, i) for i in range(args.steps)]
    peers = args.peers.split(",")
    STORE.mkdir(parents=True, exist_ok=True)
    inputs = STORE / "peers_mobilenet_inputs.pt"  # ~0.6 GB per 32 steps of batch 32; the runners map it, not load it
    if set(peers) - {"edgequant"}:
        torch.save({"state_dict": model.state_dict(), "calib_x": cal, "train": train, "eval_x": ev, "ref_logits": ref,
                    "batch": args.batch, "eval_seed": args.eval_seed}, inputs)
    rows = []
    for peer in peers:
        out = STORE / f"peers_mobilenet_{peer}.json"
        if peer == "edgequant":
            rows += _edgequant_mobilenet_row(args, model, cal, train, ev, ref, out)
            continue
        options = ["--model", "mobilenet", "--steps", str(args.steps), "--lr", str(args.lr)]
        mine = [v.split(":", 1)[1] for v in (args.peer_variants or "").split(",") if v.startswith(peer + ":")]
        if mine:
            options += ["--variants", ",".join(mine)]
        rows += _run_peer_runner(peer, inputs, out, options, {"config": "W4A8", "steps": args.steps}, args.peer_timeout)
    return rows


def _edgequant_mobilenet_row(args, model, cal, train, ev, ref, out: Path) -> list:
    """edgequant on the peers' MobileNetV2 inputs: the ``mobilenet`` part's W4A8 AdaRound start (200 it/layer), then
    ``prepare_qat`` (LSQ+) and ``finetune`` by distillation over the same batches at ``--lr`` (quantizer lr: lr / 10)."""
    import edgequant
    from edgequant.qat import finetune, prepare_qat

    row = {"peer": "edgequant", "version": edgequant.__version__, "variant": "adaround_lsq", "config": "W4A8",
           "steps": args.steps, "batch": args.batch, "n_calib": len(cal), "n_eval": len(ev), "eval_seed": args.eval_seed,
           "lr": args.lr, "schedule": "cosine", "threads": torch.get_num_threads(),
           "method": "`quantize(ptq=[\"bn_fold\", \"adaround\"])` (200 it/layer), then `prepare_qat` (LSQ+) and `finetune` "
                     "(distillation from FP32, Adam, cosine, quantizer lr = lr / 10)",
           "quantizes": "the `mobilenet` part's W4A8 config: 4-bit per-channel weights, 8-bit symmetric activations, input "
                        "and logits 8-bit; its PTQ start is AdaRound, not nearest rounding"}

    def run():
        t = time.perf_counter()
        sim = edgequant.quantize(model, list(cal.split(32)), _config(4, 8), ptq=["bn_fold", "adaround"],
                                 adaround_iterations=200, progress=False).sim
        row["init_seconds"] = time.perf_counter() - t
        row["ptq"] = _peer_fidelity(sim, ev, ref)
        prepare_qat(sim)
        rep = finetune(sim, train, steps=args.steps, lr=args.lr, teacher=model, progress=True)
        k = min(10, len(rep.loss))
        row.update(seconds=rep.seconds[-1], loss_first=sum(rep.loss[:k]) / k, loss_last=sum(rep.loss[-k:]) / k,
                   train_sqnr_first=sum(rep.sqnr_db[:k]) / k, train_sqnr_last=sum(rep.sqnr_db[-k:]) / k,
                   qat=_peer_fidelity(sim, ev, ref))

    rows: list = []
    _record(rows, row, run, out)
    return rows


def peer_args(argv=None):
    """The command line of a QAT peer runner (``peers/run_qat_*.py``)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs", help="the .pt file bench_qat.py --part peers saves")
    ap.add_argument("out", help="rows, as JSON")
    ap.add_argument("--steps", type=int, default=None, help="default: 8 passes over the batches of 64")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--schedule", choices=["cosine", "constant"], default="cosine", help="cosine: finetune's default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", choices=["mnist", "mobilenet"], default="mnist",
                    help="mobilenet: the inputs of bench_qat.py --part peers_mobilenet (distillation, W4A8)")
    ap.add_argument("--variants", default=None, help="comma-separated variant names (--model mobilenet; default: all)")
    return ap.parse_args(argv)


def peer_qat(peer: str, version: str, variants, argv=None) -> list:
    """Run a peer's QAT variants on the saved inputs; ``variants``: ``[(method, build)]`` where ``build(net, calib)``
    returns the peer's quantized model with its ranges set from ``calib`` (batches of 64) and a description of what
    it quantizes. Each variant: held-out accuracy after ``build`` (the peer's PTQ), training with labels (cross-entropy,
    Adam on every trainable parameter, weights and ranges alike, batches of 64 of ``train_x`` in order, cycled), held-out
    accuracy after. A variant that fails is a row with ``error``; rows are written to ``out`` after each variant."""
    from edgequant.models.mnist_net import MnistMobileNet

    args = peer_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    data = torch.load(args.inputs, weights_only=False)
    net = MnistMobileNet()
    net.load_state_dict(data["state_dict"])
    net.eval()
    batches = [(data["train_x"][i:i + 64], data["train_y"][i:i + 64]) for i in range(0, len(data["train_x"]), 64)]
    steps = 8 * len(batches) if args.steps is None else args.steps
    calib = list(data["calib_x"].split(64))
    rows = []
    for method, build in variants:
        torch.manual_seed(0)
        row = {"peer": peer, "version": version, "config": "W4A4", "steps": steps, "lr": args.lr, "schedule": args.schedule,
               "threads": args.threads, "method": method}

        def run(row=row, build=build):
            t = time.perf_counter()
            model, row["quantizes"] = build(copy.deepcopy(net), calib)
            row["init_seconds"] = time.perf_counter() - t
            row["ptq_acc"] = _peer_acc(model, data["test_x"], data["test_y"])
            t = time.perf_counter()
            row["final_loss"] = _peer_train(model, batches, steps, args.lr, args.schedule)
            row["seconds"] = time.perf_counter() - t
            row["qat_acc"] = _peer_acc(model, data["test_x"], data["test_y"])
        _record(rows, row, run, args.out)
    return rows


def _record(rows: list, row: dict, run, out) -> None:
    """``run()`` fills ``row``; a failure is recorded in it (a peer that cannot do a variant is reported, not fatal).
    The row is appended, printed, and all rows so far written to ``out``."""
    try:
        run()
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"[:400]
        import traceback
        traceback.print_exc()
    rows.append(row)
    print(json.dumps(row), flush=True)
    Path(out).write_text(json.dumps(rows, indent=1))


def _logits(out):
    return getattr(out, "value", out)  # a Brevitas QuantTensor carries its tensor as .value


def _peer_acc(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float(torch.cat([_logits(model(b)).argmax(1) for b in x.split(256)]).eq(y).float().mean())


def _adam(model, lr: float, steps: int, schedule: str):
    """Adam on every trainable parameter of ``model`` with ``finetune``'s cosine schedule (to zero at the last step)
    or a constant one: ``(optimizer, scheduler)``."""
    import math

    def factor(i):
        return 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)) if schedule == "cosine" else 1.0

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _adam_step(opt, sched, loss, step: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss {loss.item()} at step {step}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


def _peer_train(model, batches, steps: int, lr: float, schedule: str) -> float:
    """Cross-entropy with Adam over ``batches`` in order (cycled) for ``steps``; the cosine schedule is ``finetune``'s
    (to zero at the last step). Returns the mean loss of the last 10 steps."""
    opt, sched = _adam(model, lr, steps, schedule)
    model.train()
    losses = []
    for step in range(steps):
        x, y = batches[step % len(batches)]
        loss = F.cross_entropy(_logits(model(x)), y)
        _adam_step(opt, sched, loss, step)
        losses.append(float(loss.detach()))
    model.eval()
    return sum(losses[-10:]) / len(losses[-10:])


def peer_qat_mobilenet(peer: str, version: str, variants: dict, args) -> list:
    """Run a peer's W4A8 QAT variants on the MobileNetV2 inputs ``bench_qat.py --part peers_mobilenet`` saved;
    ``variants``: ``{name: (method, build)}`` where ``build(net, calib)`` returns the peer's quantized model with its
    ranges set from ``calib`` (the 128 calibration crops in batches of 32) and a description of what it quantizes. Each
    variant: fidelity to FP32 on the held-out crops after ``build`` (the peer's PTQ), distillation from the float model
    over the saved training batches in order (:func:`_peer_distill`), fidelity after. A variant that fails is a row with
    ``error``; rows are written to ``out`` after each variant."""
    import torchvision

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    data = torch.load(args.inputs, weights_only=True, mmap=True)  # the training batches stay on disk until used
    net = torchvision.models.mobilenet_v2()
    net.load_state_dict(data["state_dict"])
    net.eval()
    batches, steps = data["train"], len(data["train"]) if args.steps is None else args.steps
    calib = list(data["calib_x"].split(32))
    names = list(variants) if args.variants is None else args.variants.split(",")
    rows = []
    for name in names:
        torch.manual_seed(0)
        method, build = variants[name]
        row = {"peer": peer, "version": version, "variant": name, "config": "W4A8", "steps": steps, "batch": data["batch"],
               "n_calib": len(data["calib_x"]), "n_eval": len(data["eval_x"]), "eval_seed": data["eval_seed"], "lr": args.lr, "schedule": args.schedule, "threads": args.threads, "method": method}

        def run(row=row, build=build, name=name):
            t = time.perf_counter()
            model, row["quantizes"] = build(copy.deepcopy(net), calib)
            row["init_seconds"] = time.perf_counter() - t
            row["ptq"] = _peer_fidelity(model, data["eval_x"], data["ref_logits"])
            print(json.dumps({name: row["ptq"]}), flush=True)
            t = time.perf_counter()
            row.update(_peer_distill(model, net, batches, steps, args.lr, args.schedule))
            row["seconds"] = time.perf_counter() - t
            row["qat"] = _peer_fidelity(model, data["eval_x"], data["ref_logits"])
        _record(rows, row, run, args.out)
    return rows


def _peer_fidelity(model, x, ref) -> dict:
    """Top-1 agreement, SQNR (dB) and KL(FP32 || quantized) of ``model``'s logits on ``x`` against ``ref``."""
    from edgequant.metrics import fidelity

    model.eval()
    with torch.no_grad():
        out = torch.cat([_logits(model(b)).float() for b in x.split(64)])
    f = fidelity(ref, out)
    return {"top1": f.top1, "sqnr_db": f.sqnr_db, "kl": f.kl}


def _peer_distill(model, teacher, batches, steps: int, lr: float, schedule: str) -> dict:
    """KL(teacher || student) on softmax logits (batchmean), the teacher's logits from the float model on the same
    batch; Adam on every trainable parameter of ``model``, ``finetune``'s cosine schedule; batches in order (cycled);
    the model in train mode with its dropout modules in eval. Refuses a model that still has BatchNorm modules (each
    peer folds them before QAT, so train mode changes nothing but dropout, which is off). Returns the mean loss and
    the training-batch SQNR against the teacher over the first and the last 10 steps."""
    from edgequant.metrics import sqnr_db

    bn = [n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if bn:
        raise RuntimeError(f"BatchNorm left in the QAT model: {bn[:3]}")
    opt, sched = _adam(model, lr, steps, schedule)
    teacher.eval()
    model.train()
    dropout = [m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    for m in dropout:
        m.eval()
    losses, sq = [], []
    for step in range(steps):
        x = batches[step % len(batches)]
        with torch.no_grad():
            target = teacher(x)
        out = _logits(model(x)).float()
        loss = F.kl_div(F.log_softmax(out, 1), F.log_softmax(target, 1), reduction="batchmean", log_target=True)
        _adam_step(opt, sched, loss, step)
        losses.append(float(loss.detach()))
        sq.append(sqnr_db(target, out.detach()))
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps} loss {losses[-1]:.4f} train SQNR {sq[-1]:.2f} dB", flush=True)
    model.eval()
    k = min(10, steps)
    return {"trainable": sum(p.numel() for g in opt.param_groups for p in g["params"]), "dropout_off": len(dropout),
            "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
            "train_sqnr_first": sum(sq[:k]) / k, "train_sqnr_last": sum(sq[-k:]) / k}


def table() -> str:
    out = ["# Quantization-aware training", "",
           "Generated by `python benchmarks/bench_qat.py --part ...` (2 CPU threads). QAT = `prepare_qat(sim)` (LSQ+ grids) "
           "+ `finetune` (Adam, cosine schedule) from the PTQ result in the row.", ""]
    if (STORE / "mnist.json").exists():
        rows = json.loads((STORE / "mnist.json").read_text())
        out += ["## MNIST-5k network (labelled; held-out accuracy)", "",
                "| config | FP32 | PTQ (`ptq=\"auto\"`) | PTQ stages kept | QAT, labels | QAT, distillation (no labels) | QAT steps | QAT time (labels / distill) |",
                "|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['config']} | {r['fp32']:.4f} | {r['ptq']:.4f} | {', '.join(r['stages'])} | {r['qat_labels']:.4f} | "
                f"{r['qat_distill']:.4f} | {r['qat_steps']} | {r['qat_labels_s']:.0f} s / {r['qat_distill_s']:.0f} s |" for r in rows]
        out.append("")
    out += _peers_table()
    out += peers_mobilenet_table()
    if (STORE / "mobilenet.json").exists():
        rows = json.loads((STORE / "mobilenet.json").read_text())
        out += ["## MobileNetV2 (ImageNet weights): distillation QAT from AdaRound, held-out photos", ""]
        for r in rows:
            c = r["curve"]
            out += [f"### {r['config']} (AdaRound start {r['adaround_s']:.0f} s; lr {r['lr']}, quantizer lr "
                    f"{r.get('quantizer_lr') or r['lr'] / 10:.3g}, batch {r['batch']}, "
                    f"evaluation seed {r['eval_seed']})", "",
                    "| step | training time (s) | top-1 agreement | SQNR (dB) | KL |", "|---|---|---|---|---|"]
            out += [f"| {p['step']} | {p['seconds']:.0f} | {p['top1']:.3f} | {p['sqnr_db']:.2f} | {p['kl']:.3f} |" for p in c]
            out.append("")
    if (STORE / "cost.json").exists():
        rows = json.loads((STORE / "cost.json").read_text())
        by = {k: [r for r in rows if r["kind"] == k] for k in ("fp32", "sim")}
        t = {k: sorted(r["step_s"] for r in v)[0] for k, v in by.items()}
        m = {k: sorted(r["peak_growth_mb"] for r in v)[0] for k, v in by.items()}
        out += ["## Cost of a training step (MobileNetV2, batch 32, W4A8 LSQ+ sim vs FP32 with BN in training)", "",
                "| | FP32 | QAT sim | ratio |", "|---|---|---|---|",
                f"| seconds per step (best of 2 processes) | {t['fp32']:.2f} | {t['sim']:.2f} | {t['sim'] / t['fp32']:.2f}x |",
                f"| peak memory growth during training (MB) | {m['fp32']:.0f} | {m['sim']:.0f} | {m['sim'] / m['fp32']:.2f}x |", ""]
    return "\n".join(out)


def _peers_table() -> list:
    """The "Peers" section from ``peers.json`` (and edgequant's W4A4 labels row from ``mnist.json`` beside it)."""
    if not (STORE / "peers.json").exists():
        return []
    rows = json.loads((STORE / "peers.json").read_text())
    fmt = lambda r, k, f: "" if r.get(k) is None else format(r[k], f)  # noqa: E731
    out = ["## Peers: QAT with labels on the MNIST-5k network, W4A4 (held-out accuracy)", "",
           f"FP32 {fmt(rows[0], 'fp32', '.4f') if rows else ''}. Same network, same 512 training digits for the ranges, "
           "same batches of 64 in the same order and the same number of steps as edgequant's W4A4 labels row; Adam "
           "lr 1e-3 on every trainable parameter (weights and ranges), cosine schedule as `finetune`'s. Each peer runs in "
           "its own environment (`benchmarks/peers/run_qat_*.py`).", "",
           "| peer | config | PTQ acc | QAT acc | steps | seconds | method | quantizes / error |", "|---|---|---|---|---|---|---|---|"]
    if (STORE / "mnist.json").exists():
        for r in json.loads((STORE / "mnist.json").read_text()):
            if r["config"] == "W4A4":
                out.append(f"| edgequant | W4A4 | {r['ptq']:.4f} | {r['qat_labels']:.4f} | {r['qat_steps']} | "
                           f"{r['qat_labels_s']:.0f} | `ptq=\"auto\"` ({', '.join(r['stages'])}), then `prepare_qat` (LSQ+) "
                           "+ `finetune` (quantizer lr = lr / 10) | the MNIST table's row |")
    for r in rows:
        note = " ".join(str(r.get("error") or r.get("quantizes", "")).split()).replace("|", "/")
        out.append(f"| {r['peer']} {r.get('version', '')} | {r.get('config', '')} | {fmt(r, 'ptq_acc', '.4f')} | "
                   f"{fmt(r, 'qat_acc', '.4f')} | {r.get('steps', '')} | {fmt(r, 'seconds', '.0f')} | {r.get('method', '')} | {note} |")
    return out + [""]


def peers_mobilenet_table() -> list:
    """The "Peers" MobileNetV2 section from the ``peers_mobilenet_{peer}.json`` files (lines; empty without them)."""
    rows = [r for peer in ("aimet", "brevitas", "edgequant") if (STORE / f"peers_mobilenet_{peer}.json").exists()
            for r in json.loads((STORE / f"peers_mobilenet_{peer}.json").read_text())]
    if not rows:
        return []
    r0 = next((r for r in rows if "error" not in r), rows[0] if rows else {})

    def fid(r, k):
        f = r.get(k)
        return ("| | |" if f is None else f"{f['top1']:.3f} | {f['sqnr_db']:.2f} | {f['kl']:.3f} |")

    out = ["## Peers: distillation QAT on MobileNetV2, W4A8 (held-out photos)", "",
           f"Real MobileNetV2 (ImageNet weights); the `mobilenet` part's inputs: ranges from the same {r0.get('n_calib', '')} "
           f"calibration crops, then the same {r0.get('steps', '')} training batches of {r0.get('batch', '')} fresh crops of the "
           f"calibration photos in the same order (no mosaics), distillation from FP32 without labels (KL(FP32 || "
           f"quantized) on softmax logits, batchmean), Adam lr {r0.get('lr', '')} on every trainable parameter (weights "
           f"and ranges), cosine schedule to zero as `finetune`'s, dropout off, BN folded; fidelity to FP32 on the same "
           f"{r0.get('n_eval', '')} held-out photo crops (evaluation seed {r0.get('eval_seed', '')}; top-1 agreement, logit "
           f"SQNR, KL(FP32 || quantized)). Each peer runs in its own environment (`benchmarks/peers/run_qat_*.py --model "
           f"mobilenet`, threads: {r0.get('threads', '')}). PTQ = the peer's quantized model after its range calibration, "
           f"before training (nearest rounding). Seconds: training only (the float teacher's forward included).", "",
           "| peer | method | PTQ top-1 | PTQ SQNR dB | PTQ KL | QAT top-1 | QAT SQNR dB | QAT KL | steps | seconds | "
           "quantizes / error |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = " ".join(str(r.get("error") or r.get("quantizes", "")).split()).replace("|", "/")
        if "train_sqnr_first" in r:
            note += (f" (training-batch SQNR vs FP32 {r['train_sqnr_first']:.2f} -> {r['train_sqnr_last']:.2f} dB, "
                     f"first / last 10 steps)")
        secs = "" if r.get("seconds") is None else f"{r['seconds']:.0f}"
        out.append(f"| {r['peer']} {r.get('version', '')} | {r.get('method', '')} | {fid(r, 'ptq')} {fid(r, 'qat')} "
                   f"{r.get('steps', '')} | {secs} | {note} |")
    return out + [""]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["mnist", "mobilenet", "cost", "bn", "peers", "peers_mobilenet", "table"],
                    default="table")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--quantizer-lr", type=float, default=None, help="default: finetune's (lr / 10)")
    ap.add_argument("--configs", default="w4a8,w4a4", help="MobileNetV2 configs, e.g. w4a8,w4a4")
    ap.add_argument("--eval", type=int, default=256)
    ap.add_argument("--eval-seed", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--mnist-epochs", type=int, default=8)
    ap.add_argument("--mosaic", action="store_true", help="--part mobilenet: half of each batch 2x2 mosaics of four photos")
    ap.add_argument("--peer-timeout", type=int, default=3 * 3600, help="seconds per QAT peer (--part peers)")
    ap.add_argument("--peers", default="aimet,brevitas,edgequant", help="--part peers_mobilenet: which peers")
    ap.add_argument("--peer-variants", default=None,
                    help="--part peers_mobilenet: variants to run, e.g. aimet:tf,brevitas:relu6_max (default: all)")
    ap.add_argument("--cost-child", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "qat.md"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(int(os.environ.get("EDGEQUANT_BENCH_THREADS", "2")))
    torch.manual_seed(0)
    if args.cost_child:
        print(json.dumps(_cost_child(args.cost_child, args.batch)))
        return
    if args.part == "bn":  # its own file: qat.md is built from the other parts' stored rows
        from edgequant.io.encodings import atomic_write_text
        rows = part_bn(args)
        _save("bn", rows)
        atomic_write_text(ROOT / "benchmarks" / "results" / "qat_bn.md", bn_table(rows))
        return
    if args.part == "peers_mobilenet":  # printed on its own: qat.md keeps hand-kept sections the generator cannot rebuild
        part_peers_mobilenet(args)
        text = "\n".join(peers_mobilenet_table())
        (STORE / "peers_mobilenet.md").write_text(text)
        print(text)
        return
    if args.part != "table":
        _save(args.part, {"mnist": part_mnist, "mobilenet": part_mobilenet, "cost": part_cost, "peers": part_peers}[args.part](args))
    Path(args.out).write_text(table())
    print(table())


if __name__ == "__main__":
    main()
