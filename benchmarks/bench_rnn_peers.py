"""Recurrent networks (issue 12), peer rows: AIMET, Brevitas and ONNX Runtime quantizing the SAME row-by-row
MNIST-5k LSTM / GRU classifiers that ``benchmarks/bench_rnn.py`` trains, on the same calibration and test digits.

Steps (``--part``; ``all`` runs prepare, peers, table in that order, and ``latency`` only with ``--latency``):

* ``prepare``: per split (``mnist_5k(seed=s)``) and architecture, train the model exactly as
  ``bench_rnn.py --part accuracy`` does (``train_row_rnn(..., epochs=15, seed=seed)``), check its held-out
  FP32 accuracy against the one ``bench_rnn.py`` recorded in ``.peers/rnn/accuracy.json`` (when present),
  and save the state_dicts, the 512 calibration digits and the 1,000 test digits/labels with ``torch.save``
  under ``.peers/rnn/peer_data/`` (``manifest.json`` lists them with their sha256 and FP32 accuracy).
  Models already saved with the same settings are reused.
* ``peers``: run ``benchmarks/peers/run_rnn_<peer>.py`` for each peer as a subprocess (with a timeout) in its
  own environment: ``bench_peers.ensure_env`` creates ``.peers/venvs/aimet`` / ``.peers/venvs/brevitas``
  (pinned ``aimet-torch==2.42.0`` / ``brevitas==0.13.4``, the project's site-packages visible); ONNX Runtime
  runs in the project's environment. Each runner writes ``.peers/rnn/peers/<peer>.json``.
* ``edgequant``: the project's own configs of ``bench_rnn.py`` (W8A8, W8A8 8-bit cell, W4A8, W4A8 + AdaRound)
  on the same saved models, so the table compares like with like.
* ``latency``: ONNX Runtime FP32 vs int8 latency at batch 1 and 64 (median of 20 runs, intra_op_num_threads=2).
  Run it last, alone: the machine may be shared, so the load average is recorded with every row.
* ``table``: collect everything into ``.peers/rnn/peers.json`` and print a markdown table.

    python benchmarks/bench_rnn_peers.py --part all --seeds 0,1 --archs lstm,gru,lstm-2-bi
    python benchmarks/bench_rnn_peers.py --part latency
    python benchmarks/bench_rnn_peers.py --part table

The runners import the loading/recording helpers below (they need only torch), so every peer reads the
same files and scores with the same ``accuracy`` function.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from bench_peers import sha256  # the peer table's file hash

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / ".peers" / "rnn"
DATA = RAW / "peer_data"
OUT = RAW / "peers"
COLLECTED = RAW / "peers.json"
#: arch -> (cell, layers, bidirectional), as in bench_rnn.py
ARCHS = {"lstm": ("lstm", 1, False), "gru": ("gru", 1, False), "lstm-2-bi": ("lstm", 2, True), "gru-2-bi": ("gru", 2, True)}
PEERS = {"aimet": "run_rnn_aimet.py", "brevitas": "run_rnn_brevitas.py", "ort": "run_rnn_ort.py"}


# ----------------------------------------------------------------------------------------------- shared helpers
def manifest() -> dict:
    f = DATA / "manifest.json"
    return json.loads(f.read_text()) if f.exists() else {"splits": {}, "models": []}


def load_split(split: int):
    """``(calibration digits (512, 28, 28), test digits (1000, 28, 28), test labels)`` of a split."""
    d = torch.load(DATA / f"split{split}_data.pt", weights_only=True)
    return d["xcal"], d["xte"], d["yte"]


def load_model(entry: dict):
    """The trained float :class:`RowRNN` of a manifest entry, in eval mode."""
    from edgequant.models.mnist_rnn import RowRNN

    net = RowRNN(entry["cell"], entry["hidden"], entry["layers"], entry["bidirectional"])
    net.load_state_dict(torch.load(DATA / entry["file"], weights_only=True))
    return net.eval()


def accuracy(fn, x, y, bs: int = 500) -> float:
    """Held-out accuracy of ``fn`` (a batch of rows -> logits, a torch tensor or a numpy array)."""
    preds = []
    with torch.no_grad():
        for b in x.split(bs):
            out = fn(b)
            out = out if torch.is_tensor(out) else torch.as_tensor(out)
            preds.append(out.float().argmax(1))
    return float(torch.cat(preds).eq(y).float().mean())


def selected(args) -> list[dict]:
    seeds = {int(s) for s in args.seeds.split(",")}
    archs = args.archs.split(",")
    return [m for m in manifest()["models"] if m["split"] in seeds and m["arch"] in archs]


class PeerRows:
    """Rows of one peer in ``.peers/rnn/peers/<peer>.json``; rows of (split, arch, config) not rerun stay.

    ``row(entry, config, fn)``: ``fn()`` returns ``(logits_fn, notes)``; the accuracy is scored here and the
    seconds are those of ``fn()`` (building + calibrating). Any exception is recorded as the row's error."""

    def __init__(self, peer: str, version: str):
        self.peer, self.version = peer, version
        self.path = OUT / f"{peer}.json"
        OUT.mkdir(parents=True, exist_ok=True)
        old = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.rows, self.latency = old.get("rows", []), old.get("latency", [])

    def row(self, entry: dict, config: str, fn, xte, yte, extra_notes: str = "") -> dict:
        rec = {"split": entry["split"], "arch": entry["arch"], "config": config, "accuracy": None, "seconds": None,
               "notes": extra_notes, "fp32_manifest": entry["fp32"], "load_average": os.getloadavg()[0]}
        print(f"[{self.peer}] split {entry['split']} {entry['arch']}: {config} ...", flush=True)
        try:
            t0 = time.perf_counter()
            logits_fn, notes = fn()
            rec["seconds"] = time.perf_counter() - t0
            rec["accuracy"] = accuracy(logits_fn, xte, yte)
            rec["notes"] = "; ".join(n for n in (notes, extra_notes) if n)
        except Exception as e:  # noqa: BLE001  (a peer that cannot do a row is reported, never faked)
            rec["error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"[:600]
            traceback.print_exc()
        print(f"[{self.peer}]   -> {rec['accuracy'] if rec['accuracy'] is not None else rec['error']}", flush=True)
        key = (rec["split"], rec["arch"], rec["config"])
        self.rows = [r for r in self.rows if (r["split"], r["arch"], r["config"]) != key] + [rec]
        self.save()
        return rec

    def save(self):
        doc = {"peer": self.peer, "version": self.version, "rows": self.rows, "latency": self.latency}
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.path)


def as_is(net):
    """A row's ``fn`` for the float model itself."""
    return net, "the float model in this environment"


def runner_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--archs", default="lstm,gru,lstm-2-bi")
    ap.add_argument("--latency", action="store_true", help="ORT only: time FP32 vs int8 instead of accuracy")
    ap.add_argument("--repeats", type=int, default=20)
    return ap.parse_args()


# ----------------------------------------------------------------------------------------------- orchestration
def _bench_rnn_fp32() -> dict:
    f = RAW / "accuracy.json"
    if not f.exists():
        return {}
    return {(r["split"], r["arch"]): r for r in json.loads(f.read_text())}


def part_prepare(args) -> None:
    from edgequant.data.mnist import mnist_5k
    from edgequant.models.mnist_rnn import train_row_rnn

    DATA.mkdir(parents=True, exist_ok=True)
    man = manifest()
    reported = _bench_rnn_fp32()
    for seed in [int(s) for s in args.seeds.split(",")]:
        xtr, ytr, xte, yte = mnist_5k(seed=seed)
        xtr, xte = xtr.flatten(1, 2), xte.flatten(1, 2)
        dfile = DATA / f"split{seed}_data.pt"
        torch.save({"xcal": xtr[:512].clone(), "xte": xte.clone(), "yte": yte.clone()}, dfile)
        man["splits"][str(seed)] = {"file": dfile.name, "sha256": sha256(dfile), "n_cal": 512, "n_test": len(yte)}
        for arch in args.archs.split(","):
            cell, layers, bi = ARCHS[arch]
            fname = f"split{seed}_{arch}.pt"
            old = next((m for m in man["models"] if m["split"] == seed and m["arch"] == arch), None)
            if (old and old["hidden"] == args.hidden and old["epochs"] == args.epochs and (DATA / fname).exists()
                    and sha256(DATA / fname) == old["sha256"] and not args.retrain):
                print(f"split {seed} {arch}: reusing {fname} (FP32 {old['fp32']:.4f})", flush=True)
                continue
            t = time.perf_counter()
            net = train_row_rnn(xtr, ytr, cell, args.hidden, layers, bi, epochs=args.epochs, seed=seed)
            train_s = time.perf_counter() - t
            fp32 = accuracy(net, xte, yte)
            torch.save(net.state_dict(), DATA / fname)
            entry = {"split": seed, "arch": arch, "cell": cell, "layers": layers, "bidirectional": bi,
                     "hidden": args.hidden, "epochs": args.epochs, "file": fname, "sha256": sha256(DATA / fname),
                     "fp32": fp32, "train_s": train_s}
            # the same model reloaded from disk must score the same
            entry["fp32_reloaded"] = accuracy(load_model(entry), xte, yte)
            rep = reported.get((seed, arch))
            if rep is not None and rep.get("hidden") == args.hidden and rep.get("epochs") == args.epochs:
                entry["fp32_bench_rnn"] = rep["FP32"]
                entry["fp32_matches_bench_rnn"] = abs(rep["FP32"] - fp32) < 1e-6
            man["models"] = [m for m in man["models"] if not (m["split"] == seed and m["arch"] == arch)] + [entry]
            print(json.dumps(entry), flush=True)
            (DATA / "manifest.json").write_text(json.dumps(man, indent=1))
    (DATA / "manifest.json").write_text(json.dumps(man, indent=1))


def _run(peer: str, extra: list[str], args) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_peers import ensure_env

    info = {"peer": peer, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        py = ensure_env(peer)
        cmd = [str(py), str(ROOT / "benchmarks" / "peers" / PEERS[peer]), "--seeds", args.seeds, "--archs", args.archs,
               *extra]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "benchmarks"))
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, timeout=args.timeout, cwd=ROOT, check=False)
        info.update(exit_code=proc.returncode, wall_seconds=time.perf_counter() - t0)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        info["error"] = f"{type(e).__name__}: {e}"[:600]
    print(json.dumps(info), flush=True)
    return info


def part_peers(args) -> None:
    runs = [_run(p, [], args) for p in args.peers.split(",")]
    runs_file = RAW / "peer_runs.json"
    old = json.loads(runs_file.read_text()) if runs_file.exists() else []
    runs_file.write_text(json.dumps(old + runs, indent=1))


def part_edgequant(args) -> None:
    """edgequant's own rows (``bench_rnn.py``'s configs) on the same saved models, for a like-for-like table."""
    import warnings

    from bench_rnn import _configs

    import edgequant as eq
    from edgequant.ptq.adaround import adaround

    warnings.simplefilter("ignore")
    rec = PeerRows("edgequant", getattr(eq, "__version__", ""))
    for entry in selected(args):
        xcal, xte, yte = load_split(entry["split"])
        cal = list(xcal.split(64))
        net = load_model(entry)
        for name, (cfg, ada) in _configs().items():
            if "cell" in name and entry["cell"] != "lstm":
                continue

            def run(net=net, xcal=xcal, cal=cal, cfg=cfg, ada=ada):
                sim = eq.QuantSim(net, xcal[:2], cfg)
                sim.calibrate(cal, progress=False)
                if ada:
                    adaround(sim, cal, iterations=800, progress=False)
                    sim.calibrate(cal, progress=False)
                return sim, "bench_rnn.py config"
            rec.row(entry, name, run, xte, yte)


def part_latency(args) -> None:
    _run("ort", ["--latency", "--repeats", str(args.repeats)], args)


def collect() -> dict:
    man = manifest()
    doc = {"manifest": man, "peers": {}}
    for peer in [*PEERS, "edgequant"]:
        f = OUT / f"{peer}.json"
        if f.exists():
            doc["peers"][peer] = json.loads(f.read_text())
    COLLECTED.write_text(json.dumps(doc, indent=1))
    return doc


def table(doc: dict) -> str:
    fp32 = {(m["split"], m["arch"]): m["fp32"] for m in doc["manifest"]["models"]}
    out = ["| peer | split | model | config | accuracy | FP32 | drop (pt) | seconds | notes |",
           "|---|---|---|---|---|---|---|---|---|"]
    order = list(ARCHS)
    for peer, res in doc["peers"].items():
        rows = sorted(res["rows"], key=lambda r: (r["split"], order.index(r["arch"])))
        for r in rows:
            ref = fp32.get((r["split"], r["arch"]))
            acc = r.get("accuracy")
            cells = [f"{peer} {res.get('version', '')}", str(r["split"]), r["arch"], r["config"],
                     "FAILED" if acc is None else f"{acc:.3f}", "-" if ref is None else f"{ref:.3f}",
                     "-" if acc is None or ref is None else f"{100 * (ref - acc):+.1f}",
                     "-" if r.get("seconds") is None else f"{r['seconds']:.1f}",
                     " ".join((r.get("error") or r.get("notes") or "").split()).replace("|", "/")]
            out.append("| " + " | ".join(cells) + " |")
    lat = doc["peers"].get("ort", {}).get("latency", [])
    if lat:
        out += ["", ("ONNX Runtime latency (median of the runs, intra_op_num_threads=2; the machine may be shared: "
                     "load average recorded):"), "",
                "| split | model | batch | model file | ms / batch | ms / sequence | vs FP32 | load avg |",
                "|---|---|---|---|---|---|---|---|"]
        for r in lat:
            out.append(f"| {r['split']} | {r['arch']} | {r['batch']} | {r['model']} | {r['median_ms']:.3f} | "
                       f"{r['median_ms'] / r['batch']:.3f} | {r['ratio_vs_fp32']:.2f}x | {r['load_average']:.2f} |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["prepare", "peers", "edgequant", "latency", "table", "all"], default="all")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--archs", default="lstm,gru,lstm-2-bi")
    p.add_argument("--peers", default=",".join(PEERS))
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--retrain", action="store_true", help="train again even if a saved model matches")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per peer subprocess")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--latency", action="store_true", help="with --part all: also run the latency part, last")
    args = p.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    if args.part in ("prepare", "all"):
        part_prepare(args)
    if args.part in ("peers", "all"):
        part_peers(args)
    if args.part in ("edgequant", "all"):
        part_edgequant(args)
    if args.part == "latency" or (args.part == "all" and args.latency):
        part_latency(args)
    print("\n" + table(collect()))


if __name__ == "__main__":
    sys.exit(main())
