"""8-bit fidelity over several partitions of the photos: every peer on the same partitions.

The 19 bundled photos are split into 9 calibration and 10 evaluation photos (by photo, never mixed) in
``--partitions`` ways: partition 0 is the project's own split (``edgequant.data.photos``), the others
shuffle the photos with seeds 1, 2, ...; each partition is run with every ``--calib`` size (crops drawn
from the calibration photos) and the same ``--eval`` evaluation crops. Each peer runs its runner from
``benchmarks/peers`` in its own environment (see ``bench_peers.py``) on each partition's saved inputs.

The table gives, per row, the mean and the min-max over the partitions of top-1 agreement, logit SQNR
and KL against FP32 MobileNetV2, and a per-partition table of SQNR and KL for the main rows.

Usage: python benchmarks/bench_splits.py [--partitions 5] [--calib 128,256] [--eval 256]
       [--peers edgequant,nncf,torchao,ort,aimet] [--rows w8a8_pc,w8a8_pt_cle,best]
       [--out benchmarks/results/splits.md]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "benchmarks" / "peers"))

import bench_peers  # noqa: E402

SPLITS_DIR = bench_peers.PEERS_DIR / "splits"


def partition(k: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(calibration photos, evaluation photos)`` of partition ``k`` (0: the project's own)."""
    from edgequant.data.photos import CALIBRATION_PHOTOS, EVALUATION_PHOTOS

    if k == 0:
        return CALIBRATION_PHOTOS, EVALUATION_PHOTOS
    photos = list(CALIBRATION_PHOTOS + EVALUATION_PHOTOS)
    random.Random(k).shuffle(photos)
    n = len(CALIBRATION_PHOTOS)
    return tuple(photos[:n]), tuple(photos[n:])


def prepare(k: int, n_cal: int, n_eval: int) -> Path:
    """Save partition ``k``'s inputs once (MobileNetV2 only); returns the folder."""
    from edgequant.data.photos import photo_crops

    folder = SPLITS_DIR / f"p{k}_c{n_cal}"
    cal_photos, ev_photos = partition(k)
    want = {"partition": k, "calibration_photos": list(cal_photos), "evaluation_photos": list(ev_photos),
            "sizes": [n_cal, n_eval]}
    stamp = folder / "inputs.json"
    if stamp.exists() and all(json.loads(stamp.read_text()).get(key) == v for key, v in want.items()):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    # crop seeds: partition 0 with seeds 0/1 is exactly the input of bench_peers.py
    cal = photo_crops(cal_photos, n_cal, seed=2 * k)
    ev = photo_crops(ev_photos, n_eval, seed=2 * k + 1)
    bench_peers.save_imagenet(folder, cal, ev)
    bench_peers.write_stamp(folder, want)
    return folder


def summarize(table: list[dict]) -> dict:
    """``{(n_cal, row, peer, method): {metric: [values over partitions]}}``."""
    groups: dict = {}
    for r in table:
        if "sqnr_db" not in r:
            continue
        key = (r["n_cal"], r["row"], r["peer"], r["method"])
        g = groups.setdefault(key, {"top1": [], "sqnr_db": [], "kl": [], "partition": []})
        for m in ("top1", "sqnr_db", "kl"):
            g[m].append(r[m])
        g["partition"].append(r["partition"])
    return groups


def markdown(table: list[dict], partitions: int, n_eval: int, errors: list[str]) -> str:
    from common import ROWS

    groups = summarize(table)
    lines = [f"MobileNetV2 (ImageNet weights), W8A8, {partitions} partitions of the 19 photos into 9 calibration / "
             f"10 evaluation photos; {n_eval} evaluation crops; mean [min, max] over the partitions.", ""]
    for p in range(partitions):
        c, e = partition(p)
        lines.append(f"- partition {p}: calibration {', '.join(c)}; evaluation {', '.join(e)}")
    lines += ["", "| calib crops | row | peer | method | n | top-1 agr | SQNR dB | KL |", "|---|---|---|---|---|---|---|---|"]
    f = lambda v, fmt: f"{np.mean(v):{fmt}} [{min(v):{fmt}}, {max(v):{fmt}}]"  # noqa: E731
    order = list(ROWS)
    for key in sorted(groups, key=lambda k: (k[0], order.index(k[1]) if k[1] in order else 99, k[2], k[3])):
        g = groups[key]
        lines.append(f"| {key[0]} | {ROWS.get(key[1], key[1])} | {key[2]} | {key[3]} | {len(g['kl'])} | "
                     f"{f(g['top1'], '.3f')} | {f(g['sqnr_db'], '.2f')} | {f(g['kl'], '.3f')} |")
    lines += ["", "Per partition (SQNR dB / KL), the W8A8 per-channel and one-call rows:", ""]
    main = [k for k in groups if k[1] in ("w8a8_pc", "best")]
    cols = sorted({(r["n_cal"], r["partition"]) for r in table})
    lines.append("| peer | method | " + " | ".join(f"c{n} p{p}" for n, p in cols) + " |")
    lines.append("|---|---|" + "---|" * len(cols))
    for key in sorted({k[1:] for k in main}):
        cells = []
        for n, p in cols:
            r = next((t for t in table if (t["n_cal"], t["partition"], t["row"], t["peer"], t["method"]) == (n, p, *key)
                      and "sqnr_db" in t), None)
            cells.append("" if r is None else f"{r['sqnr_db']:.2f} / {r['kl']:.4f}")
        lines.append(f"| {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    lines += per_photo(table)
    if errors:
        lines += ["", "Errors:", ""] + [f"- {e}" for e in errors]
    return "\n".join(lines)


#: the rows compared photo by photo: edgequant's default recipe against NNCF's defaults
PER_PHOTO = (("edgequant", "BN fold + activation equalization + first-layer sum rounding + bias correction"),
             ("nncf", "nncf.quantize defaults (per-channel weights, fast bias correction)"))


def _photo_sqnr(r: dict) -> dict:
    """``{photo: logit SQNR dB over that photo's evaluation crops}`` for a scored row (crops are drawn
    round-robin from the evaluation photos, so crop ``i`` comes from photo ``i % 10``)."""
    folder = SPLITS_DIR / f"p{r['partition']}_c{r['n_cal']}"
    ref = np.load(folder / "imagenet_fp32_logits.npy").astype(np.float64)
    got = np.load(folder / "results" / r["peer"] / r["imagenet_logits"]).astype(np.float64)
    photos = partition(r["partition"])[1]
    which = np.arange(len(ref)) % len(photos)
    return {p: 10 * np.log10((ref[which == i] ** 2).sum() / ((got[which == i] - ref[which == i]) ** 2).sum())
            for i, p in enumerate(photos)}


def per_photo(table: list[dict]) -> list[str]:
    """Per evaluation photo, the logit SQNR of edgequant's default recipe and of NNCF's defaults in each
    column where both ran (``PER_PHOTO``): which photos decide a partition."""
    found = {}
    for r in table:
        key = (r["peer"], r["method"])
        if key in PER_PHOTO and "sqnr_db" in r and r.get("imagenet_logits"):
            found.setdefault((r["n_cal"], r["partition"]), {})[key] = _photo_sqnr(r)
    cols = sorted(c for c, v in found.items() if len(v) == len(PER_PHOTO))
    if not cols:
        return []
    photos = sorted({p for c in cols for p in found[c][PER_PHOTO[0]]})
    lines = ["", "Per evaluation photo (logit SQNR dB over its crops, edgequant default recipe / NNCF defaults; "
             "**bold** where edgequant is behind; empty where the photo calibrates):", "",
             "| photo | " + " | ".join(f"c{n} p{p}" for n, p in cols) + " |", "|---|" + "---|" * len(cols)]
    for photo in photos:
        cells = []
        for c in cols:
            e, n = (found[c][k].get(photo) for k in PER_PHOTO)
            cells.append("" if e is None else (f"**{e:.2f} / {n:.2f}**" if e < n else f"{e:.2f} / {n:.2f}"))
        lines.append(f"| {photo} | " + " | ".join(cells) + " |")
    ahead = [sum(found[c][PER_PHOTO[0]][p] > found[c][PER_PHOTO[1]][p] for p in found[c][PER_PHOTO[0]]) for c in cols]
    lines.append("| edgequant ahead on | " + " | ".join(f"{a} of {len(found[c][PER_PHOTO[0]])}"
                                                       for a, c in zip(ahead, cols)) + " |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--partitions", type=int, default=5)
    ap.add_argument("--only", default=None, help="comma-separated partition numbers to (re)run (default: all)")
    ap.add_argument("--calib", default="128,256")
    ap.add_argument("--eval", type=int, default=256)
    ap.add_argument("--peers", default="edgequant,nncf,torchao,ort,aimet")
    ap.add_argument("--rows", default="w8a8_pc,w8a8_pt_cle,best")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per peer and partition")
    ap.add_argument("--table-only", action="store_true", help="table the results already under .peers/splits")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "splits.md"))
    args = ap.parse_args()
    sizes = [int(c) for c in args.calib.split(",")]
    only = set(range(args.partitions)) if args.only is None else {int(k) for k in args.only.split(",")}
    rows = args.rows.split(",")
    table, errors = [], []
    for n_cal in sizes:
        for k in range(args.partitions):
            folder = prepare(k, n_cal, args.eval)
            for peer in args.peers.split(","):
                out = folder / "results" / peer
                if k in only and not args.table_only:
                    print(f"== partition {k}, {n_cal} calibration crops: {peer}", flush=True)
                    try:
                        bench_peers.run_peer(peer, folder, out, rows, None, args.timeout, keep_other_rows=True)
                    except Exception as e:  # a peer that fails is reported, the others still run
                        errors.append(f"partition {k}, {n_cal} crops, {peer}: {type(e).__name__}: {e}"[:300])
                res_file = out / "results.json"
                if not res_file.exists():
                    continue
                res = dict(json.loads(res_file.read_text()), folder=str(out))
                res["rows"] = [r for r in res["rows"] if r["row"] in rows]
                for r in bench_peers.score([res], folder, out.parent):
                    r.update(n_cal=n_cal, partition=k)
                    if r.get("error"):
                        errors.append(f"partition {k}, {n_cal} crops, {peer} {r['method']}: {r['error']}"[:300])
                    table.append(r)
    text = markdown(table, args.partitions, args.eval, errors)
    print("\n" + text)
    from edgequant.io.encodings import atomic_write_text

    atomic_write_text(args.out, text + "\n")
    atomic_write_text(SPLITS_DIR / "table.json", json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
