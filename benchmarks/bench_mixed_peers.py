"""Mixed precision side by side: edgequant's search, AIMET's AMP and Sony MCT's mixed-precision PTQ.

Same model (MobileNetV2, ImageNet weights, batch norms folded by ``edgequant.ptq.fold_batch_norms``),
same calibration crops (``calibration_crops(64)``, batches of 16), same held-out crops
(``evaluation_crops(64)``, other photos), same budgets: a share (0.5, 0.75) of the bit operations of the
all-W8A16 model, where bit operations are MACs x weight bits x input-activation bits of every conv/linear
(``edgequant.sim.cost``'s definition; the peers count it the same way on their own quantized models, see
their docstrings). Candidates per quantizer: W8A16 (high) and W4A8 (low), or the closest a peer accepts.

The inputs are written once under ``.peers/mixed/`` (``torch.save``: the folded model's state_dict, the
crops, the FP32 logits); each peer runs in its own virtual environment (``ensure_env`` of
``bench_peers.py``: ``.peers/venvs/<peer>``, the project's site-packages visible) and writes
``.peers/mixed/<peer>.json``; edgequant's own ``mixed_precision`` runs here, in the project's
environment, on the same files. Held-out SQNR / top-1 agreement are ``edgequant.metrics.fidelity``
against the FP32 logits, in every environment. Every process runs torch with one thread.

    python benchmarks/bench_mixed_peers.py [--peers edgequant,aimet,mct] [--targets 0.5,0.75]
        [--table-only] [--out benchmarks/results/mixed_precision_peers.md]
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_peers

DATA = REPO / ".peers" / "mixed"
#: peer -> (pip requirements, runner); AIMET's pins are bench_peers.py's own
MIXED_PEERS = {
    "aimet": (bench_peers.PEERS["aimet"][0], "run_mixed_aimet.py"),
    "mct": (["model-compression-toolkit==2.6.1"], "run_mixed_mct.py"),  # newest on the registry; installs beside torch 2.14.1
}
BATCH = 16


def ensure_env(peer: str) -> Path:
    """bench_peers.ensure_env, with this benchmark's peers registered (bench_peers.py is not changed on disk)."""
    bench_peers.PEERS.setdefault(peer, MIXED_PEERS[peer])
    return bench_peers.ensure_env(peer)


def folded_model():
    from edgequant.models import mobilenet_v2_imagenet
    from edgequant.ptq import fold_batch_norms

    return fold_batch_norms(mobilenet_v2_imagenet().eval())[0].eval()


def prepare(n_cal: int, n_eval: int) -> None:
    """Write the inputs once (delete .peers/mixed/inputs.json to rebuild)."""
    stamp = DATA / "inputs.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("sizes") == [n_cal, n_eval]:
        return
    from edgequant.data import calibration_crops, evaluation_crops

    DATA.mkdir(parents=True, exist_ok=True)
    model = folded_model()
    cal, ev = calibration_crops(n_cal), evaluation_crops(n_eval)
    with torch.no_grad():
        ref = torch.cat([model(b) for b in ev.split(32)])
        cal_ref = torch.cat([model(b) for b in cal.split(32)])
    torch.save(model.state_dict(), DATA / "model_folded.pt")
    torch.save(cal, DATA / "calibration.pt")
    torch.save(ev, DATA / "evaluation.pt")
    torch.save(ref, DATA / "fp32_logits.pt")
    torch.save(cal_ref, DATA / "fp32_calibration_logits.pt")
    stamp.write_text(json.dumps({"sizes": [n_cal, n_eval], "batch": BATCH}))


def run_edgequant(targets: list[float]) -> dict:
    """edgequant.analysis.mixed_precision with a bit-operation budget, on the saved files."""
    import edgequant
    from edgequant.analysis import mixed_precision
    from edgequant.metrics import fidelity
    from edgequant.models import mobilenet_v2_imagenet
    from edgequant.ptq import fold_batch_norms

    model = fold_batch_norms(mobilenet_v2_imagenet().eval())[0].eval()
    model.load_state_dict(torch.load(DATA / "model_folded.pt", weights_only=True))
    cal, ev, ref = (torch.load(DATA / f, weights_only=True) for f in ("calibration.pt", "evaluation.pt", "fp32_logits.pt"))
    batches = list(cal.split(BATCH))
    out = {"peer": "edgequant", "version": getattr(edgequant, "__version__", ""), "rows": []}
    for t in targets:
        row = {"target": t, "load_average": os.getloadavg()[0]}
        try:
            t0 = time.perf_counter()
            res = mixed_precision(model, batches, high="w8a16", low="w4a8", budget=t, progress=False)
            row["seconds"] = time.perf_counter() - t0
            if res.sim is None:
                raise RuntimeError(f"no front point within {t} of the all-high bit operations")
            with torch.no_grad():
                f = fidelity(ref, torch.cat([res.sim(b) for b in ev.split(32)]))
            row.update(bops=res.chosen.bops, high_bops=res.high_bops, sqnr_db=f.sqnr_db, top1=f.top1,
                       note=f"{len(res.chosen.lowered)} quantizers at W4A8 (the all-low point lowers {len(res.front[0].lowered)}); search score "
                            f"(SQNR dB on 32 calibration crops) {res.chosen.score:.2f}, rebuilt {res.verified_score:.2f}")
        except Exception as e:  # noqa: BLE001  (recorded in the row)
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        out["rows"].append(row)
        print(row, flush=True)
    (DATA / "edgequant.json").write_text(json.dumps(out, indent=1))
    return out


def run_peer(peer: str, targets: list[float], timeout: int) -> None:
    try:
        py = ensure_env(peer)
    except Exception as e:  # noqa: BLE001
        err = f"environment: {type(e).__name__}: {e}"
        (DATA / f"{peer}.json").write_text(json.dumps({"peer": peer, "rows": [{"target": t, "error": err} for t in targets]}))
        return
    runner = REPO / "benchmarks" / "peers" / MIXED_PEERS[peer][1]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([str(py), str(runner), str(DATA), "--targets", ",".join(map(str, targets))],
                              env=env, timeout=timeout, check=False)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = f"timeout after {timeout} s"
    res_file = DATA / f"{peer}.json"
    res = json.loads(res_file.read_text()) if res_file.exists() else {"peer": peer, "rows": []}
    if rc != 0 and not res["rows"]:
        res["rows"] = [{"target": t, "error": f"runner exited with {rc}"} for t in targets]
    res["exit_code"], res["wall_seconds"] = rc, time.perf_counter() - t0
    res_file.write_text(json.dumps(res, indent=1))


def table(peers: list[str]) -> str:
    fmt = lambda v, f: "" if v is None else format(v, f)
    lines = [("| peer | target (share of all-W8A16 bit-ops) | chosen G bit-ops | share of all-W8A16 | held-out SQNR dB | "
              "held-out top-1 agr | search s | notes |"), "|---|---|---|---|---|---|---|---|"]
    results = {p: json.loads((DATA / f"{p}.json").read_text()) for p in peers if (DATA / f"{p}.json").exists()}
    # a runner that does not count its own all-high model is set against the others' count (same definition)
    ref_high = next((r["high_bops"] for res in results.values() for r in res["rows"] if r.get("high_bops")), None)
    for peer in peers:
        f = DATA / f"{peer}.json"
        if not f.exists():
            lines.append(f"| {peer} | | | | | | | not run |")
            continue
        res = json.loads(f.read_text())
        for r in res["rows"]:
            bops, high = r.get("bops"), r.get("high_bops") or ref_high
            note = " ".join((("ERROR: " + r["error"] + "; ") if r.get("error") else "").split()) + " ".join(r.get("note", "").split())
            if r.get("load_average") is not None:
                note += f" (load average {r['load_average']:.1f})"
            lines.append(f"| {peer} {res.get('version', '')} | {r['target']} | {fmt(bops and bops / 1e9, '.2f')} | "
                         f"{fmt(bops / high if bops and high else None, '.3f')} | {fmt(r.get('sqnr_db'), '.2f')} | "
                         f"{fmt(r.get('top1'), '.3f')} | {fmt(r.get('seconds'), '.0f')} | {note.replace('|', '/')} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default="edgequant,aimet,mct")
    ap.add_argument("--targets", default="0.5,0.75")
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=64)
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--table-only", action="store_true", help="print the table of the saved results")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    peers, targets = args.peers.split(","), [float(t) for t in args.targets.split(",")]
    if not args.table_only:
        prepare(args.calib, args.eval)
        for peer in peers:
            print(f"== {peer}", flush=True)
            run_edgequant(targets) if peer == "edgequant" else run_peer(peer, targets, args.timeout)
    text = (f"MobileNetV2 (ImageNet weights, BN folded), {args.calib} calibration crops (batches of {BATCH}), {args.eval} "
            f"held-out crops of other photos; torch threads 1; bit-ops = MACs x weight bits x input-activation bits "
            f"(the share: of the all-W8A16 count of each runner, else of another's)\n\n" + table(peers) + "\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
