"""Side-by-side benchmark: edgequant against AIMET, torchao PT2E, ONNX Runtime, Brevitas and NNCF.

Same float models, same calibration inputs, same evaluation inputs, saved once to disk (their sha256
is printed); each peer runs in its own process and its own virtual environment under ``.peers/``
(git-ignored). A peer's environment sees the project's environment through a ``.pth`` file, so the
pinned torch is shared and only the peer's own packages are installed. Every peer's logits are
scored here by the same code (:func:`edgequant.analysis.fidelity`).

Columns: fidelity to FP32 on real MobileNetV2 with photo crops (top-1 agreement, top-5 overlap,
logit SQNR, KL), accuracy of the MNIST-5k network trained here, quantization wall time, and the
quantized model's forward time relative to FP32 in the same process. Each row records the load
average and thread count it ran under: timings only count on an otherwise idle machine.

Usage: python benchmarks/bench_peers.py [--peers edgequant,ort,nncf,torchao,aimet,brevitas]
       [--calib 128] [--eval 256] [--out benchmarks/results/peers.md]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
PEERS_DIR = REPO / ".peers"
PY = f"python{sys.version_info.major}.{sys.version_info.minor}"

#: peer -> (pip requirements, runner); None: the project's own environment
PEERS = {
    "edgequant": (None, "run_edgequant.py"),
    "ort": (None, "run_ort.py"),  # onnxruntime is a dependency of edgequant itself
    "nncf": (["nncf==3.4.0"], "run_nncf.py"),
    "torchao": (["torchao==0.18.0"], "run_torchao.py"),
    "aimet": (["aimet-torch==2.42.0", "panel<1.8"], "run_aimet.py"),  # panel<1.8: else pip backtracks for long
    "brevitas": (["brevitas==0.13.4", "accelerate==1.15.0"], "run_brevitas.py"),
}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare_data(folder: Path, n_cal: int, n_eval: int) -> dict:
    """Save the inputs once; later runs reuse them (delete the folder to rebuild)."""
    from edgequant.data import calibration_crops, evaluation_crops

    stamp = folder / "inputs.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("sizes") == [n_cal, n_eval]:
        return json.loads(stamp.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    save_imagenet(folder, calibration_crops(n_cal), evaluation_crops(n_eval))
    train_s = save_mnist(folder)
    return write_stamp(folder, {"sizes": [n_cal, n_eval], "mnist_train_seconds": round(train_s, 1)})


def write_stamp(folder: Path, info: dict) -> dict:
    info["sha256"] = {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.suffix in (".npy", ".pt", ".onnx")}
    (folder / "inputs.json").write_text(json.dumps(info, indent=1))
    return info


def save_imagenet(folder: Path, cal: torch.Tensor, ev: torch.Tensor) -> None:
    """MobileNetV2's calibration and evaluation crops, its FP32 logits and its BN-folded FP32 ONNX model."""
    from edgequant.models import mobilenet_v2_imagenet

    np.save(folder / "imagenet_calibration.npy", cal.numpy())
    np.save(folder / "imagenet_evaluation.npy", ev.numpy())
    model = mobilenet_v2_imagenet()
    with torch.no_grad():
        np.save(folder / "imagenet_fp32_logits.npy", torch.cat([model(b) for b in ev.split(32)]).numpy())
    _float_onnx(model, ev[:1], folder / "mobilenet_v2_folded_fp32.onnx")


def save_mnist(folder: Path) -> float:
    """The MNIST-5k net trained here (fixed seed), its data and FP32 logits; returns the training seconds."""
    from edgequant.data.mnist import mnist_5k
    from edgequant.models.mnist_net import train_mnist_net

    torch.manual_seed(0)
    xtr, ytr, xte, yte = mnist_5k()
    t0 = time.perf_counter()
    net = train_mnist_net(xtr, ytr)
    train_s = time.perf_counter() - t0
    torch.save(net.state_dict(), folder / "mnist_net.pt")
    np.save(folder / "mnist_calibration.npy", xtr[:512].numpy())
    np.save(folder / "mnist_evaluation.npy", xte.numpy())
    np.save(folder / "mnist_labels.npy", yte.numpy())
    with torch.no_grad():
        np.save(folder / "mnist_fp32_logits.npy", net(xte).numpy())
    _float_onnx(net, xte[:1], folder / "mnist_net_folded_fp32.onnx")
    return train_s


def _float_onnx(model, x, path: Path) -> None:
    """The float model (BN folded) as ONNX, for the ONNX Runtime peer."""
    from edgequant import QuantSim, export_onnx
    from edgequant.ptq import fold_batch_norms

    sim = QuantSim(fold_batch_norms(model)[0], x, "w8a8")
    sim.calibrate([x], progress=False)  # export needs encodings; they are unused with quantization disabled
    with sim.quantization_disabled():
        export_onnx(sim, path)
    path.with_name(path.name.replace(".onnx", ".encodings.json")).unlink(missing_ok=True)


def ensure_env(peer: str, reqs: list[str] | None = None) -> Path:
    """The peer's virtual environment (created on first use); ``reqs`` for peers outside :data:`PEERS`."""
    reqs = PEERS[peer][0] if reqs is None else reqs
    if reqs is None:
        return Path(sys.executable)
    venv = PEERS_DIR / "venvs" / peer
    py = venv / "bin" / "python"
    stamp = venv / ".installed"
    if stamp.exists() and stamp.read_text() == " ".join(reqs) and py.exists():
        return py
    if not py.exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([os.path.join(sys.base_prefix, "bin", PY), "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    base = next((REPO / ".venv" / "lib").glob("python3*/site-packages"))
    # the peer sees the project's packages (torch, torchvision, numpy, edgequant's dependencies) after its own
    (site / "_edgequant_base.pth").write_text(f"import site; site.addsitedir({str(base)!r})\n")
    print(f"installing {' '.join(reqs)} into {venv} ...", flush=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *reqs], check=True)
    stamp.write_text(" ".join(reqs))
    return py


def run_peer(peer: str, data: Path, out: Path, rows: list[str], adaround_iterations, timeout: int,
             keep_other_rows: bool = False) -> dict:
    py = ensure_env(peer)
    runner = REPO / "benchmarks" / "peers" / PEERS[peer][1]
    cmd = [str(py), str(runner), str(data), str(out), "--rows", ",".join(rows)]
    if adaround_iterations:
        cmd += ["--adaround-iterations", str(adaround_iterations)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("EDGEQUANT_BENCH_THREADS", "2"),
               PYTHONPATH=str(REPO / "benchmarks" / "peers"), EDGEQUANT_PEERS_KEEP_OTHER_ROWS="1" if keep_other_rows else "0")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, timeout=timeout)
    res_file = out / "results.json"
    res = json.loads(res_file.read_text()) if res_file.exists() else {"peer": peer, "rows": []}
    res["exit_code"], res["wall_seconds"], res["folder"] = proc.returncode, time.perf_counter() - t0, str(out)
    return res


def score(results: list[dict], data: Path, out_root: Path) -> list[dict]:
    from edgequant.analysis import fidelity

    ref = torch.from_numpy(np.load(data / "imagenet_fp32_logits.npy"))
    labels = np.load(data / "mnist_labels.npy") if (data / "mnist_labels.npy").exists() else None
    table = []
    for res in results:
        for r in res["rows"]:
            row = dict(r, peer=res["peer"], version=res.get("version", ""))
            folder = Path(res.get("folder", out_root / res["peer"]))
            if "imagenet_logits" in r:
                f = fidelity(ref, torch.from_numpy(np.load(folder / r["imagenet_logits"])))
                row.update(top1=f.top1, top5=f.top5, sqnr_db=f.sqnr_db, kl=f.kl, top1_confident=f.top1_confident)
            if "mnist_logits" in r and labels is not None:
                row["mnist_accuracy"] = float((np.load(folder / r["mnist_logits"]).argmax(1) == labels).mean())
            table.append(row)
    return table


def markdown(table: list[dict], info: dict, header: str) -> str:
    from common import ROWS  # noqa: E402  (benchmarks/peers on sys.path)

    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    lines = [header, "", "inputs (sha256): " + ", ".join(f"`{k}` {v[:12]}" for k, v in info["sha256"].items()), "",
             "| row | peer | method | top-1 agr | top-5 | SQNR dB | KL | top-1 agr (conf) | MNIST acc | quant s | fwd / FP32 | load avg | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rid, label in ROWS.items():
        for r in [t for t in table if t["row"] == rid]:
            note = " ".join((r.get("error") or r.get("note", "")).split())
            lines.append(f"| {label} | {r['peer']} {r.get('version', '')} | {r['method']} | {fmt(r.get('top1'), '.3f')} | "
                         f"{fmt(r.get('top5'), '.3f')} | {fmt(r.get('sqnr_db'), '.2f')} | {fmt(r.get('kl'), '.3f')} | "
                         f"{fmt(r.get('top1_confident'), '.3f')} | {fmt(r.get('mnist_accuracy'), '.4f')} | "
                         f"{fmt(r.get('seconds'), '.1f')} | {fmt(r.get('forward_ratio'), '.2f')} | "
                         f"{fmt(r.get('load_average'), '.2f')} | {note.replace('|', '/')} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--rows", default=None, help="comma-separated row ids (default: all)")
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval", type=int, default=256)
    ap.add_argument("--adaround-iterations", type=int, default=None,
                    help="AdaRound iterations per layer for every peer (default: each peer's own default)")
    ap.add_argument("--timeout", type=int, default=4 * 3600, help="seconds per peer")
    ap.add_argument("--merge", action="store_true",
                    help="also table the results other peers left in .peers/results from earlier runs (each row keeps its "
                         "load average); with --rows, a rerun peer keeps its earlier results for the other rows")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "peers.md"))
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "benchmarks" / "peers"))
    from common import ROWS

    data = PEERS_DIR / "data"
    info = prepare_data(data, args.calib, args.eval)
    print("inputs saved once in", data)
    for k, v in info["sha256"].items():
        print(f"  sha256 {v}  {k}")
    rows = args.rows.split(",") if args.rows else list(ROWS)
    results = []
    for peer in args.peers.split(","):
        if peer not in PEERS:
            raise SystemExit(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")
        out = PEERS_DIR / "results" / peer
        try:
            res = run_peer(peer, data, out, rows, args.adaround_iterations, args.timeout,
                           keep_other_rows=args.merge and args.rows is not None)
        except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            res = {"peer": peer, "rows": [{"row": r, "method": "-", "error": f"{type(e).__name__}: {e}"[:300]} for r in rows]}
        results.append(dict(res, peer_key=peer))
    if args.merge:
        ran = {r["peer_key"] for r in results}
        for peer in PEERS:
            f = PEERS_DIR / "results" / peer / "results.json"
            if peer not in ran and f.exists():
                results.append(dict(json.loads(f.read_text()), folder=str(f.parent), peer_key=peer))
        order = list(PEERS)
        results.sort(key=lambda r: order.index(r["peer_key"]))
    table = score(results, data, PEERS_DIR / "results")
    header = (f"MobileNetV2 (ImageNet weights) on {args.calib} calibration / {args.eval} evaluation photo crops; "
              f"MNIST-5k net trained here (FP32 accuracy {float((np.load(data / 'mnist_fp32_logits.npy').argmax(1) == np.load(data / 'mnist_labels.npy')).mean()):.4f}); "
              f"torch {torch.__version__}, {os.environ.get('EDGEQUANT_BENCH_THREADS', '2')} threads per peer, one process per peer")
    text = markdown(table, info, header)
    print("\n" + text)
    from edgequant.io.encodings import atomic_write_text

    atomic_write_text(args.out, text + "\n")
    atomic_write_text(PEERS_DIR / "results" / "table.json", json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
