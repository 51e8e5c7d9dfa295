"""Compression (issue 14): low-rank factorization with per-layer ratios for a whole-model target.

Parts (``--part``; raw results in ``.peers/compress/<part>.json``, table in ``benchmarks/results/compression.md``):

* ``mnist``: a CNN with 3x3 convolutions trained here on MNIST-5k (per split: ``mnist_5k(seed=s)``, a model
  trained on it); spatial SVD of its 3x3 convs to 0.5 of the model's MACs, knapsack and AIMET-style greedy
  selection; held-out accuracy before, after, and after a one-epoch fine-tune; then W8A8 of the compressed
  model; ONNX Runtime latency of original / compressed, FP32 / INT8 (fresh process, 2 threads).
* ``minilm``: all-MiniLM-L6-v2 (real weights), weight SVD of its Linear layers to 0.8 and 0.6 of the
  parameters (of the Linear layers' total), real sentences (``sentence_split``, seeds 0 and 1): embedding
  cosine similarity and nearest-neighbour agreement against FP32 on held-out sentences.
* ``peers``: MobileNetV2 split 0, 0.9 / 0.8 / 0.7 of the MACs, no fine-tune: Torch-Pruning (its own environment,
  ``peers/run_compress_tp.py``; uniform and global L2 magnitude), AIMET's channel pruning with its greedy selection
  (``peers/run_compress_aimet_cp.py``) beside edgequant's channel pruning with reconstruction (channel counts as
  selected and rounded to multiples of 8), selection time on 2 cores; and the MNIST CNN's spatial SVD against
  AIMET's; written to ``benchmarks/results/compression_peers.md``. ``--pieces tp,aimet_cp,edgequant,mnist`` reruns
  some (each piece's rows in ``.peers/compress/peers_<piece>.json``; the table takes every piece found).
* ``table``: the markdown file from the raw results.

    python benchmarks/bench_compress.py --part mnist
    python benchmarks/bench_compress.py --part minilm
"""
from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / ".peers" / "compress"
RESULTS = ROOT / "benchmarks" / "results" / "compression.md"


def mnist_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64 * 49, 128), nn.ReLU(), nn.Linear(128, 10))


def _acc(m, x, y) -> float:
    with torch.no_grad():
        return float(torch.cat([m(b).argmax(1) for b in x.split(500)]).eq(y).float().mean())


def _latency(models: dict, x1, x64, threads, repeats, calib=None) -> dict:
    import edgequant as eq
    from ort_latency import latencies

    tmp = Path(tempfile.mkdtemp())
    paths = {}
    name = "x"
    for label, (model, sim) in models.items():
        if calib is not None and not all(q.is_initialized for q in sim.quantizers().values()):
            sim.calibrate(calib, progress=False)
        name = next(n.target for n in sim.model.graph.nodes if n.op == "placeholder")  # the export names it so
        for kind in ("fp32", "int8"):
            paths[f"{label} {kind}"] = {}
            for bs, x in ((1, x1), (len(x64), x64)):
                p = str(tmp / f"{label}_{kind}_{bs}.onnx")
                if kind == "fp32":
                    torch.onnx.export(model, (x,), p, dynamo=False, input_names=[name], opset_version=17)
                else:
                    eq.export_onnx(sim, p, example_inputs=x, dynamic_batch=False)
                paths[f"{label} {kind}"][bs] = p
    return latencies(paths, {1: {name: x1.numpy()}, len(x64): {name: x64.numpy()}}, threads, repeats)


def _mnist_setup(seed: int, epochs: int):
    """``(xtr, ytr, xte, yte, net, data, convs)``: MNIST-5k split ``seed``, the CNN trained on it, 256 training
    digits in batches (what compression scores on) and the names of its 3x3 convs."""
    from edgequant.data.mnist import mnist_5k
    from edgequant.models.mnist_net import train_classifier

    xtr, ytr, xte, yte = mnist_5k(seed=seed)
    torch.manual_seed(seed)
    net = train_classifier(mnist_cnn(), xtr, ytr, epochs, seed, 64, 2e-3)
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    return xtr, ytr, xte, yte, net, list(xtr[:256].split(64)), convs


def part_mnist(args) -> list:
    import edgequant as eq
    from edgequant.compress import compress
    from edgequant.models.mnist_net import train_classifier

    rows = []
    for seed in (0, 1):
        xtr, ytr, xte, yte, net, data, convs = _mnist_setup(seed, args.epochs)
        row = {"split": seed, "fp32": _acc(net, xte, yte)}
        for solver in ("knapsack", "greedy"):
            t = time.perf_counter()
            res = compress(net, data, target=0.5, layers=convs, solver=solver, progress=False)
            row[solver] = {"acc": _acc(res.model, xte, yte), "macs": res.macs_after / res.macs_before, "sqnr_db": res.score,
                           "select_s": time.perf_counter() - t, "ratios": {c.name: c.ratio for c in res.layers}}
            tuned = train_classifier(res.model, xtr, ytr, 1, seed, 64, 5e-4)
            row[solver]["acc_finetuned"] = _acc(tuned, xte, yte)
            if solver == "knapsack":
                compressed = tuned
        sims = {}
        for label, model in (("original", net), ("compressed", compressed)):
            sim = eq.QuantSim(model, xtr[:1], "w8a8")
            sim.calibrate(data, progress=False)
            sims[label] = (model, sim)
            row[f"{label}_w8a8_acc"] = _acc(sim, xte, yte)
        row["latency_ms"] = _latency(sims, xte[:1], xte[:64], args.threads, args.repeats)
        rows.append(row)
        _save("mnist", rows)
        print(json.dumps(row), flush=True)
    return rows


def _save(part: str, rows: list) -> None:
    """Raw rows as they come (a long run stopped early keeps what it measured)."""
    RAW.mkdir(parents=True, exist_ok=True)
    (RAW / f"{part}.json").write_text(json.dumps(rows, indent=1))


def part_mobilenet(args) -> list:
    """MobileNetV2 channel pruning with reconstruction to 0.9 / 0.8 / 0.7 of the MACs (one sensitivity search per
    split), held-out fidelity in float and at W8A8, ORT latency of original vs compressed (FP32 and INT8)."""
    import edgequant as eq
    from edgequant.compress import compress
    from edgequant.data import calibration_crops, evaluation_crops
    from edgequant.metrics import fidelity
    from edgequant.models import mobilenet_v2_imagenet
    from edgequant.ptq import fold_batch_norms

    model, _ = fold_batch_norms(mobilenet_v2_imagenet().eval())
    a, b = calibration_crops(args.calib), evaluation_crops(args.eval)
    rows = []
    for split, (cx, ex) in enumerate(((a, b), (b[:args.calib], a[:args.eval]))):
        data = list(cx.split(16))
        with torch.no_grad():
            ref = torch.cat([model(t) for t in ex.split(32)])

        def fid(m):
            with torch.no_grad():
                f = fidelity(ref, torch.cat([m(t) for t in ex.split(32)]))
            return {"top1": f.top1, "sqnr_db": f.sqnr_db}
        row = {"split": split}
        sim = eq.QuantSim(model, cx[:1], "w8a8")
        sim.calibrate(data, progress=False)
        row["original"] = {"float": {"top1": 1.0, "sqnr_db": float("inf")}, "w8a8": fid(sim), "macs": 1.0}
        curves, t = None, time.perf_counter()
        for target in (0.9, 0.8, 0.7):
            res = compress(model, data, target=target, method="prune", ratios=(0.25, 0.4, 0.55, 0.7, 0.85),
                           curves=curves, multiple=8, progress=False)
            if curves is None:
                row["search_s"] = time.perf_counter() - t
            curves = res.curves
            sim = eq.QuantSim(res.model, cx[:1], "w8a8")
            sim.calibrate(data, progress=False)
            row[f"pruned {target}"] = {"float": fid(res.model), "w8a8": fid(sim), "macs": res.macs_after / res.macs_before,
                                       "chains": sum(c.ratio < 1 for c in res.layers)}
            if target == 0.7:
                pruned = (res.model, sim)
        if split == 0:
            row["latency_ms"] = _latency({"original": (model, eq.QuantSim(model, cx[:1], "w8a8")), "pruned 0.7": pruned},
                                         cx[:1], cx[:16], args.threads, args.repeats, calib=data)
        rows.append(row)
        _save("mobilenet", rows)
        print(json.dumps(row), flush=True)
    return rows


PEER_PIECES = ("tp", "aimet_cp", "edgequant", "mnist")


def part_peers(args) -> str:
    """The peer rows, by piece (``--pieces``, default all; each piece's raw rows in ``.peers/compress/peers_<piece>.json``,
    the table from every piece found there)."""
    import subprocess
    import sys

    from edgequant.compress import compress
    from edgequant.data import calibration_crops, evaluation_crops
    from edgequant.io.encodings import atomic_write_text
    from edgequant.metrics import fidelity
    from edgequant.models import mobilenet_v2_imagenet
    from edgequant.ptq import fold_batch_norms

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_peers

    RAW.mkdir(parents=True, exist_ok=True)
    cx, ex = calibration_crops(args.calib), evaluation_crops(args.eval)
    inputs = RAW / "peer_inputs.pt"
    torch.save({"example": cx[:1], "calibration": cx, "evaluation": ex}, inputs)
    pieces = args.pieces.split(",") if args.pieces else PEER_PIECES

    def save(piece, rows):
        (RAW / f"peers_{piece}.json").write_text(json.dumps(rows, indent=1))

    if "tp" in pieces:
        rows = []
        py = bench_peers.ensure_env("torch_pruning", ["torch-pruning==1.6.1"])
        for extra in ([], ["--global-pruning"]):
            out = RAW / f"tp{'_global' if extra else ''}.json"
            subprocess.run([str(py), str(ROOT / "benchmarks" / "peers" / "run_compress_tp.py"), str(inputs), str(out)] + extra,
                           check=True)
            rows += json.loads(out.read_text())
        save("tp", rows)
    if "aimet_cp" in pieces:
        out = RAW / "aimet_cp.json"
        subprocess.run([str(bench_peers.ensure_env("aimet")), str(ROOT / "benchmarks" / "peers" / "run_compress_aimet_cp.py"),
                        str(inputs), str(out)], check=True)
        save("aimet_cp", json.loads(out.read_text()))
    if "edgequant" in pieces:
        rows = []
        model, _ = fold_batch_norms(mobilenet_v2_imagenet().eval())
        data = list(cx.split(16))
        with torch.no_grad():
            ref = torch.cat([model(t) for t in ex.split(32)])
        for multiple in (1, 8):
            curves, t = None, time.perf_counter()
            for target in (0.9, 0.8, 0.7):
                res = compress(model, data, target=target, method="prune", ratios=(0.25, 0.4, 0.55, 0.7, 0.85),
                               curves=curves, multiple=multiple, progress=False)
                sec = time.perf_counter() - t
                curves, t = res.curves, time.perf_counter()
                with torch.no_grad():
                    f = fidelity(ref, torch.cat([res.model(b) for b in ex.split(32)]))
                rows.append({"peer": "edgequant", "target": target, "macs": res.macs_after / res.macs_before, "top1": f.top1,
                             "sqnr_db": f.sqnr_db, "seconds": sec,
                             "method": f"compress(method='prune', multiple={multiple}): knapsack on per-chain curves, "
                                       "least-squares reconstruction (shrunk correlations), no fine-tune" +
                                       (" (seconds: the sensitivity search)" if target == 0.9 else " (seconds: reusing the curves)")})
                print(json.dumps(rows[-1]), flush=True)
                save("edgequant", rows)
    if "mnist" in pieces:
        save("mnist", _mnist_peers(args, bench_peers))
    rows = [r for piece in ("tp", "aimet_cp", "edgequant") if (RAW / f"peers_{piece}.json").exists()
            for r in json.loads((RAW / f"peers_{piece}.json").read_text())]
    mnist = json.loads((RAW / "peers_mnist.json").read_text()) if (RAW / "peers_mnist.json").exists() else []
    text = ["# Compression peers: MobileNetV2 channel pruning (issue 14)", "",
            f"Generated by `python benchmarks/bench_compress.py --part peers` (2 CPU threads). MobileNetV2 (ImageNet weights), "
            f"{args.calib} calibration crops, {args.eval} held-out crops of other photos; fidelity to FP32 (top-1 agreement, logit "
            "SQNR) of the pruned float model, no fine-tune.", "",
            "| peer | method | target MACs | kept MACs | top-1 agreement | SQNR dB | seconds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            text.append(f"| {r['peer']} | {r.get('method', '')} | {r['target']:.1f} | fails: {r['error'][:200]} | | | |")
        else:
            text.append(f"| {r['peer']} {r.get('version', '')} | {r['method']} | {r['target']:.1f} | {r['macs']:.3f} | "
                        f"{r['top1']:.3f} | {r['sqnr_db']:.2f} | {r['seconds']:.0f} |")
    text += ["", "## MNIST CNN (3x3 convs, trained here): spatial SVD to 0.5 of the MACs, no fine-tune", "",
             "Held-out accuracy (MNIST-5k test part of each seed). edgequant scores candidates by output SQNR against the "
             "original on 256 training digits; AIMET's greedy selection by the accuracy on the same digits (its eval_callback).",
             "", "| seed | peer | method | kept MACs | accuracy before | accuracy after | selection s |", "|---|---|---|---|---|---|---|"]
    text += [f"| {r['seed']} | {r['peer']} | {r['method']} | {r['macs']:.3f} | {r['acc_before']:.4f} | {r['acc']:.4f} | "
             f"{r['seconds']:.1f} |" for r in mnist]
    atomic_write_text(ROOT / "benchmarks" / "results" / "compression_peers.md", "\n".join(text) + "\n")
    return "\n".join(text)


def _mnist_peers(args, bench_peers) -> list:
    """Spatial SVD of the MNIST CNN to 0.5 of the MACs: edgequant (knapsack and greedy) and AIMET (its runner)."""
    import os
    import subprocess

    from edgequant.compress import compress

    py = bench_peers.ensure_env("aimet")
    rows = []
    for seed in (0, 1):
        xtr, ytr, xte, yte, net, data, convs = _mnist_setup(seed, args.epochs)
        before = _acc(net, xte, yte)

        def ours(method, target, **kw):
            t = time.perf_counter()
            res = compress(net, data, target=target, layers=convs, progress=False, **kw)
            rows.append({"seed": seed, "peer": "edgequant", "macs": res.macs_after / res.macs_before, "acc_before": before,
                         "acc": _acc(res.model, xte, yte), "seconds": time.perf_counter() - t,
                         "method": f"compress({method}), 3x3 convs"})
        for solver in ("knapsack", "greedy"):
            ours(f"target=0.5, solver={solver!r}", 0.5, solver=solver)
        inputs = RAW / f"mnist_seed{seed}.pt"
        torch.save({"state_dict": net.state_dict(), "score_x": xtr[:256], "score_y": ytr[:256], "test_x": xte, "test_y": yte},
                   inputs)
        out = RAW / f"aimet_mnist_seed{seed}.json"
        subprocess.run([str(py), str(ROOT / "benchmarks" / "peers" / "run_compress_aimet.py"), str(inputs), str(out)],
                       check=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "benchmarks" / "peers")))
        aimet = [dict(r, seed=seed) for r in json.loads(out.read_text())]
        rows += aimet
        # AIMET's greedy may land below the target (every layer at its lowest ratio when the accuracy does not move):
        # edgequant at the MACs AIMET reached, for a like-for-like row
        reached = aimet[0]["macs"]
        ours(f"target={reached:.3f}: the MACs AIMET reached", reached, ratios=(0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9))
        print(json.dumps(rows[-4:]), flush=True)
    return rows


def part_minilm(args) -> list:
    from bench_transformers import SEQ, batches, embed, fidelity

    from edgequant.compress import compress
    from edgequant.data import sentence_split
    from edgequant.models import minilm_l6_v2, tokenize

    enc, tok = minilm_l6_v2()
    linears = [n for n, m in enc.named_modules() if type(m) is nn.Linear]
    rows = []
    for seed in (0, 1):
        cal_s, ev_s = sentence_split(64, 256, seed=seed)
        cal, ev = batches(*tokenize(tok, cal_s, SEQ)), batches(*tokenize(tok, ev_s, SEQ))
        ref = embed(enc, ev)
        for data_aware, target in itertools.product((True, False), (0.8, 0.6)):
            if target == 0.8:
                curves = None  # one sensitivity search per split and kind of SVD
            t = time.perf_counter()
            res = compress(enc, cal, target=target, what="params", layers=linears, of="layers", curves=curves,
                           data_aware=data_aware, progress=False)
            curves = res.curves
            kept_linear = (sum(c.params_after for c in res.layers) / sum(c.params_before for c in res.layers))
            cos, nn_agree = fidelity(ref, embed(res.model, ev))
            rows.append({"split": seed, "svd": "data-aware" if data_aware else "plain",
                         "target_params_of_linears": target, "kept_linear_params": kept_linear,
                         "kept_model_params": res.params_after / res.params_before, "cosine": cos, "nn_agreement": nn_agree,
                         "select_s": time.perf_counter() - t, "layers_factored": sum(c.ratio < 1 for c in res.layers)})
            _save("minilm", rows)
            print(json.dumps(rows[-1]), flush=True)
    return rows


def table() -> str:
    out = ["# Compression: low-rank factorization, per-layer ratios for a whole-model target", "",
           "Generated by `python benchmarks/bench_compress.py --part table` from `.peers/compress/*.json` (2 CPU threads).", ""]
    mnist = RAW / "mnist.json"
    if mnist.exists():
        out += ["## CNN with 3x3 convs on MNIST-5k: spatial SVD of the 3x3 convs to 0.5 of the MACs", "",
                "Held-out accuracy (1,000 digits of the split); `+1 ep` = one epoch of fine-tuning on the training digits "
                "(Adam 5e-4); selection scored by output SQNR on 128 training digits.", "",
                "| split | FP32 | solver | kept MACs | acc after | acc after +1 ep | selection s | W8A8 original / compressed |",
                "|---|---|---|---|---|---|---|---|"]
        lat = []
        for r in json.loads(mnist.read_text()):
            for solver in ("knapsack", "greedy"):
                s = r[solver]
                out.append(f"| {r['split']} | {r['fp32']:.3f} | {solver} | {s['macs']:.2f} | {s['acc']:.3f} | {s['acc_finetuned']:.3f} | "
                           f"{s['select_s']:.1f} | {r['original_w8a8_acc']:.3f} / {r['compressed_w8a8_acc']:.3f} |")
            lat.append(r["latency_ms"])
        out += ["", "ONNX Runtime latency, ms (median, fresh process, 2 threads; compressed = knapsack, fine-tuned):", "",
                "| split | model | batch 1 | batch 64 |", "|---|---|---|---|"]
        for i, latency in enumerate(lat):
            for k, v in latency.items():
                out.append(f"| {i} | {k} | {v.get('1', v.get(1)):.3f} | {v.get('64', v.get(64)):.3f} |")
    mobilenet = RAW / "mobilenet.json"
    if mobilenet.exists():
        out += ["", "## MobileNetV2 (ImageNet weights, BN folded): channel pruning with reconstruction", "",
                "Held-out fidelity to FP32 (top-1 agreement, logit SQNR dB) on crops of other photos; split 1 swaps the "
                "calibration and evaluation photos; one sensitivity search per split serves the three targets; kept "
                "channels rounded up to multiples of 8 (`compress(multiple=8)`); no fine-tune.", "",
                "| split | model | kept MACs | chains pruned | float top-1 / SQNR | W8A8 top-1 / SQNR |", "|---|---|---|---|---|---|"]
        lat = {}
        for r in json.loads(mobilenet.read_text()):
            for k, v in r.items():
                if isinstance(v, dict) and "float" in v:
                    f, q = v["float"], v["w8a8"]
                    out.append(f"| {r['split']} | {k} | {v['macs']:.2f} | {v.get('chains', '-')} | {f['top1']:.3f} / {f['sqnr_db']:.2f} | "
                               f"{q['top1']:.3f} / {q['sqnr_db']:.2f} |")
            if "search_s" in r:
                out.append(f"| {r['split']} | (sensitivity search) | | | {r['search_s']:.0f} s | |")
            lat = r.get("latency_ms", lat)
        if lat:
            out += ["", "ONNX Runtime latency, ms (median, fresh process, 2 threads):", "", "| model | " +
                    " | ".join(f"batch {b}" for b in next(iter(lat.values()))) + " |", "|---|" + "---|" * len(next(iter(lat.values())))]
            for k, v in lat.items():
                out.append(f"| {k} | " + " | ".join(f"{ms:.2f}" for ms in v.values()) + " |")
    minilm = RAW / "minilm.json"
    if minilm.exists():
        out += ["", "## all-MiniLM-L6-v2: weight SVD of the Linear layers", "",
                "Held-out sentences (256 per split); cosine similarity of sentence embeddings and nearest-neighbour "
                "agreement against FP32; the target counts the Linear layers' parameters (embeddings untouched).", "",
                "`data-aware`: the default, each Linear's SVD weighted by its inputs' second moment on the 64 calibration "
                "sentences (`compress(data_aware=True)`); `plain`: the SVD of the weights alone. Selection seconds: the "
                "sensitivity search (0.8) or reusing its curves (0.6).", "",
                "| split | SVD | target | kept Linear params | kept model params | cosine | NN agreement | layers factored | selection s |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in json.loads(minilm.read_text()):
            out.append(f"| {r['split']} | {r.get('svd', 'plain')} | {r['target_params_of_linears']:.1f} | {r['kept_linear_params']:.2f} | "
                       f"{r['kept_model_params']:.2f} | {r['cosine']:.4f} | {r['nn_agreement']:.3f} | {r['layers_factored']} | "
                       f"{r['select_s']:.0f} |")
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["mnist", "mobilenet", "minilm", "peers", "table"], required=True)
    p.add_argument("--calib", type=int, default=64)
    p.add_argument("--eval", type=int, default=128)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--pieces", default="", help=f"--part peers: a comma list of {','.join(PEER_PIECES)} (default all)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    if args.part == "peers":
        print(part_peers(args))
        return
    if args.part != "table":
        rows = {"mnist": part_mnist, "mobilenet": part_mobilenet, "minilm": part_minilm}[args.part](args)
        RAW.mkdir(parents=True, exist_ok=True)
        (RAW / f"{args.part}.json").write_text(json.dumps(rows, indent=1))
    RESULTS.write_text(table())
    print(RESULTS.read_text())


if __name__ == "__main__":
    main()
