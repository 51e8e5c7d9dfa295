"""Recurrent networks (issue 12): LSTM / GRU classifiers of MNIST-5k read row by row, trained here.

Parts (``--part``):

* ``accuracy``: per data split (``mnist_5k(seed=s)``, a model trained on each) and architecture, held-out
  accuracy of FP32, W8A8 (16-bit cell state, the default), W8A8 with an 8-bit cell state, W8A8 with every
  internal tensor on 8 bits, W4A8 nearest and W4A8 + AdaRound of the gate weights; calibration on 512
  training digits.
* ``speed``: time per sequence of the quantized layer in the sim vs ``nn.LSTM`` / ``nn.GRU`` (batch 1 and
  64, 2 threads, median of repeats, measured side by side in one process).
* ``ort``: the W8A8 models of split 0 exported to ONNX: ONNX Runtime's accuracy, agreement with the sim
  and the integer-exact sim, and ORT latency int8 vs FP32 (batch 1 and 64, fresh process).
* ``table``: ``benchmarks/results/rnn.md`` from the raw results in ``.peers/rnn/*.json``.

    python benchmarks/bench_rnn.py --part accuracy --seeds 0,1
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / ".peers" / "rnn"
RESULTS = ROOT / "benchmarks" / "results" / "rnn.md"
ARCHS = {"lstm": ("lstm", 1, False), "gru": ("gru", 1, False), "lstm-2-bi": ("lstm", 2, True), "gru-2-bi": ("gru", 2, True)}


def _configs():
    from edgequant.config import Override, QuantConfig, QuantSpec
    w8a8 = QuantConfig.preset("w8a8")
    eight = Override(activation=QuantSpec(bits=8, symmetric=True, range_method="minmax"))
    return {
        "W8A8": (w8a8, False),
        "W8A8 8-bit cell": (QuantConfig(w8a8.weight, w8a8.activation, module_names={"rnn.*.c": eight}), False),
        "W4A8": (QuantConfig.preset("w4a8"), False),
        "W4A8 + AdaRound": (QuantConfig.preset("w4a8"), True),
    }


def _acc(m, x, y) -> float:
    with torch.no_grad():
        return float(torch.cat([m(b).argmax(1) for b in x.split(500)]).eq(y).float().mean())


def part_accuracy(args) -> list:
    import edgequant as eq
    from edgequant.data.mnist import mnist_5k
    from edgequant.models.mnist_rnn import train_row_rnn
    from edgequant.ptq.adaround import adaround

    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        xtr, ytr, xte, yte = mnist_5k(seed=seed)
        xtr, xte = xtr.flatten(1, 2), xte.flatten(1, 2)
        cal = list(xtr[:512].split(64))
        for arch in args.archs.split(","):
            cell, layers, bi = ARCHS[arch]
            t = time.perf_counter()
            net = train_row_rnn(xtr, ytr, cell, args.hidden, layers, bi, epochs=args.epochs, seed=seed)
            row = {"split": seed, "arch": arch, "hidden": args.hidden, "epochs": args.epochs,
                   "train_s": time.perf_counter() - t, "FP32": _acc(net, xte, yte)}
            for name, (cfg, ada) in _configs().items():
                if "cell" in name and cell != "lstm":
                    continue
                t = time.perf_counter()
                sim = eq.QuantSim(net, xtr[:2], cfg)
                sim.calibrate(cal, progress=False)
                if ada:
                    adaround(sim, cal, iterations=args.adaround_iterations, progress=False)
                    sim.calibrate(cal, progress=False)
                row[name], row[f"{name} s"] = _acc(sim, xte, yte), time.perf_counter() - t
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def part_speed(args) -> list:
    import edgequant as eq
    from edgequant.models.mnist_rnn import RowRNN

    rows = []
    torch.manual_seed(0)
    for arch in args.archs.split(","):
        cell, layers, bi = ARCHS[arch]
        net = RowRNN(cell, args.hidden, layers, bi).eval()
        x = torch.randn(64, 28, 28)
        sim = eq.QuantSim(net, x[:2], "w8a8")
        sim.calibrate([x], progress=False)
        for batch in (1, 64):
            xb = x[:batch]
            with torch.no_grad():
                float_s = _median_time(lambda: net(xb), args.repeats)
                sim_s = _median_time(lambda: sim(xb), args.repeats)
                with sim.quantization_disabled():
                    twin_s = _median_time(lambda: sim(xb), args.repeats)
            row = {"arch": arch, "batch": batch, "float_ms_per_seq": 1e3 * float_s / batch,
                   "sim_ms_per_seq": 1e3 * sim_s / batch, "twin_float_ms_per_seq": 1e3 * twin_s / batch,
                   "ratio": sim_s / float_s}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def part_ort(args) -> list:
    """Export the W8A8 models of split 0 (and the float model), check ONNX Runtime against the sim and the
    integer-exact sim, and time ORT int8 vs FP32 (fresh process, interleaved runs)."""
    import tempfile

    import numpy as np
    import onnxruntime as ort

    import edgequant as eq
    from edgequant.data.mnist import mnist_5k
    from edgequant.models.mnist_rnn import train_row_rnn
    from ort_latency import latencies

    xtr, ytr, xte, yte = mnist_5k(seed=0)
    xtr, xte = xtr.flatten(1, 2), xte.flatten(1, 2)
    rows, tmp = [], Path(tempfile.mkdtemp())
    for arch in args.archs.split(","):
        cell, layers, bi = ARCHS[arch]
        net = train_row_rnn(xtr, ytr, cell, args.hidden, layers, bi, epochs=args.epochs, seed=0)
        sim = eq.QuantSim(net, xtr[:2], "w8a8")
        sim.calibrate(list(xtr[:512].split(64)), progress=False)
        paths = {"int8": {}, "fp32": {}}
        for bs in (1, 64):
            paths["int8"][bs] = str(tmp / f"{arch}_int8_{bs}.onnx")
            eq.export_onnx(sim, paths["int8"][bs], example_inputs=xte[:bs], dynamic_batch=False)
            paths["fp32"][bs] = str(tmp / f"{arch}_fp32_{bs}.onnx")
            torch.onnx.export(net, (xte[:bs],), paths["fp32"][bs], dynamo=False, input_names=["x"], opset_version=17)
        s = ort.InferenceSession(paths["int8"][64], providers=["CPUExecutionProvider"])
        got = np.concatenate([s.run(None, {"x": b.numpy()})[0] for b in xte.split(64) if len(b) == 64])
        n = len(got)
        with torch.no_grad():
            sim_out = torch.cat([sim(b) for b in xte.split(64) if len(b) == 64]).numpy()
            with sim.integer_exact("float32"):
                exact = torch.cat([sim(b) for b in xte.split(64) if len(b) == 64]).numpy()
        sqnr = 10 * np.log10((sim_out ** 2).sum() / max(((sim_out - got) ** 2).sum(), 1e-30))
        lat = latencies(paths, {bs: {"x": xte[:bs].numpy()} for bs in (1, 64)}, args.threads, args.repeats)
        row = {"arch": arch, "digits": n, "ort_acc": float((got.argmax(1) == yte[:n].numpy()).mean()),
               "sim_acc": float((sim_out.argmax(1) == yte[:n].numpy()).mean()),
               "top1_agree": float((got.argmax(1) == sim_out.argmax(1)).mean()),
               "identical_to_exact": float((got == exact).mean()), "sqnr_vs_sim": float(min(sqnr, 999.0)),
               "int8_ms": lat["int8"], "fp32_ms": lat["fp32"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _peer_summary(doc: dict) -> list[str]:
    """Per peer and configuration: accuracy drop (points) over every split and model it ran, and failures
    (`python benchmarks/bench_rnn_peers.py`, models trained there with one thread; full table printed there)."""
    fp32 = {(m["split"], m["arch"]): m["fp32"] for m in doc["manifest"]["models"]}
    groups: dict = {}
    for peer, res in doc["peers"].items():
        for r in res["rows"]:
            g = groups.setdefault((f"{peer} {res.get('version', '')}".strip(), r["config"]), {"drops": [], "failed": [], "arch": set()})
            ref = fp32.get((r["split"], r["arch"]))
            if r.get("accuracy") is None or ref is None:
                g["failed"].append(f"{r['arch']}: {' '.join((r.get('error') or '').split())[:90]}")
            else:
                g["drops"].append(100 * (ref - r["accuracy"]))
                g["arch"].add(r["arch"])
    out = ["", "Peers on the same trained models (`python benchmarks/bench_rnn_peers.py`; 2 splits x LSTM, GRU, "
           "2-layer bidirectional LSTM, trained there with one thread, so their FP32 differs slightly from the table "
           "above; edgequant re-run on those models). Accuracy drop vs FP32 in points (positive = loss):", "",
           "| peer | config | models | mean drop | worst drop | failed |", "|---|---|---|---|---|---|"]
    for (peer, config), g in groups.items():
        d = g["drops"]
        out.append(f"| {peer} | {config} | {', '.join(sorted(g['arch'])) or '-'} | "
                   + (f"{statistics.mean(d):+.1f} | {max(d):+.1f}" if d else "- | -")
                   + f" | {'; '.join(sorted(set(g['failed']))[:2]) or '-'} |")
    return out


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def table() -> str:
    acc = json.loads((RAW / "accuracy.json").read_text()) if (RAW / "accuracy.json").exists() else []
    speed = json.loads((RAW / "speed.json").read_text()) if (RAW / "speed.json").exists() else []
    names = ["FP32"] + list(_configs())
    out = ["# Recurrent networks: MNIST-5k read row by row (28 steps of 28 pixels)", "",
           "Generated by `python benchmarks/bench_rnn.py --part table` from `.peers/rnn/*.json` "
           "(`--part accuracy`, `--part speed`; 2 CPU threads). Held-out accuracy (1,000 digits of the split); "
           "calibration on 512 training digits; models trained here with the split's seed. "
           "W8A8 keeps the LSTM cell state on 16 bits (the default); \"8-bit cell\" overrides `rnn.*.c`.", ""]
    if acc:
        out += ["| split | model | " + " | ".join(names) + " | W8A8 drop | W4A8+AdaRound drop |",
                "|---|---|" + "---|" * (len(names) + 2)]
        for r in acc:
            cells = [_fmt(r.get(n, "-")) for n in names]
            out.append(f"| {r['split']} | {r['arch']} (h={r['hidden']}) | " + " | ".join(cells)
                       + f" | {100 * (r['FP32'] - r['W8A8']):+.1f} pt | {100 * (r['FP32'] - r['W4A8 + AdaRound']):+.1f} pt |")
    ort_rows = json.loads((RAW / "ort.json").read_text()) if (RAW / "ort.json").exists() else []
    if ort_rows:
        out += ["", "ONNX Runtime on the exported W8A8 model (split 0; unrolled cell, see `edgequant/export/recurrent.py`): "
                "agreement with the sim on the held-out digits, and latency of ORT int8 vs the float model exported by "
                "`torch.onnx` (ONNX `LSTM`/`GRU` op), fresh process, 2 threads, median.", "",
                "| model | ORT acc | sim acc | top-1 agreement | logits identical to `integer_exact` | SQNR ORT vs sim | "
                "int8 / FP32 ms, batch 1 | int8 / FP32 ms, batch 64 |", "|---|---|---|---|---|---|---|---|"]
        for r in ort_rows:
            lat = {bs: (r["int8_ms"][str(bs)] if str(bs) in r["int8_ms"] else r["int8_ms"][bs],
                        r["fp32_ms"][str(bs)] if str(bs) in r["fp32_ms"] else r["fp32_ms"][bs]) for bs in (1, 64)}
            out.append(f"| {r['arch']} | {r['ort_acc']:.3f} | {r['sim_acc']:.3f} | {r['top1_agree']:.3f} | "
                       f"{r['identical_to_exact']:.3f} | {r['sqnr_vs_sim']:.1f} dB | "
                       + " | ".join(f"{a:.2f} / {f:.2f} ({a / f:.1f}x)" for a, f in lat.values()) + " |")
    peers = ROOT / ".peers" / "rnn" / "peers.json"
    if peers.exists():
        out += _peer_summary(json.loads(peers.read_text()))
    if speed:
        out += ["", "Time per sequence, quantized layer in the sim vs the torch layer (random weights, 28 steps, "
                "median; `twin in float` = the unrolled twin with every quantizer disabled).", "",
                "| model | batch | torch ms/seq | sim ms/seq | twin in float ms/seq | sim / torch |", "|---|---|---|---|---|---|"]
        for r in speed:
            out.append(f"| {r['arch']} | {r['batch']} | {r['float_ms_per_seq']:.3f} | {r['sim_ms_per_seq']:.3f} | "
                       f"{r['twin_float_ms_per_seq']:.3f} | {r['ratio']:.1f}x |")
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["accuracy", "speed", "ort", "table"], required=True)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--archs", default="lstm,gru,lstm-2-bi")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--adaround-iterations", type=int, default=800)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    if args.part == "table":
        RESULTS.write_text(table())
        print(RESULTS.read_text())
        return
    rows = {"accuracy": part_accuracy, "speed": part_speed, "ort": part_ort}[args.part](args)
    RAW.mkdir(parents=True, exist_ok=True)
    (RAW / f"{args.part}.json").write_text(json.dumps(rows, indent=1))
    RESULTS.write_text(table())


if __name__ == "__main__":
    sys.exit(main())
