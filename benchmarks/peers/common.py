"""Shared by every peer runner: the saved inputs, the two float models, and one way to time and record rows.

A runner runs inside its peer's virtual environment (which sees the project's own packages through a
``.pth`` file) and writes ``results.json`` plus one ``.npy`` of logits per row; the orchestrator
(``benchmarks/bench_peers.py``) scores every peer with the same code.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

THREADS = int(os.environ.get("EDGEQUANT_BENCH_THREADS", "2"))
#: set by ``bench_peers.py --merge --rows ...``: keep this peer's earlier rows of the rows not rerun
KEEP_OTHER_ROWS = os.environ.get("EDGEQUANT_PEERS_KEEP_OTHER_ROWS") == "1"
torch.set_num_threads(THREADS)

ROWS = {  # row id -> label, in table order
    "w8a8_pc": "W8A8 per-channel",
    "w8a8_pt": "W8A8 per-tensor, naive",
    "w8a8_pt_cle": "W8A8 per-tensor, CLE (+ bias correction)",
    "w4a8_nearest": "W4A8 per-channel, nearest",
    "w4a8_adaround": "W4A8 per-channel, AdaRound",
    "best": "best one-call recipe",
}


class Data:
    """The inputs saved once by the orchestrator (float32 arrays, NCHW)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        ld = lambda n: torch.from_numpy(np.load(self.folder / f"{n}.npy"))  # noqa: E731
        self.cal, self.ev = ld("imagenet_calibration"), ld("imagenet_evaluation")
        #: the multi-split benchmark saves MobileNetV2 inputs only: then every MNIST part is None
        self.has_mnist = (self.folder / "mnist_net.pt").exists()
        self.mnist_cal, self.mnist_ev, self.mnist_labels = (
            (ld("mnist_calibration"), ld("mnist_evaluation"), ld("mnist_labels")) if self.has_mnist else (None, None, None))
        self.fp32_onnx = self.folder / "mobilenet_v2_folded_fp32.onnx"
        self.mnist_fp32_onnx = self.folder / "mnist_net_folded_fp32.onnx"

    def mobilenet(self):
        """torchvision's MobileNetV2 with its ImageNet weights, unmodified (BatchNorm not folded)."""
        from edgequant.models.mobilenet import mobilenet_v2_imagenet

        return mobilenet_v2_imagenet().eval()

    def mnist_net(self):
        from edgequant.models.mnist_net import MnistMobileNet

        if not self.has_mnist:
            return None
        net = MnistMobileNet()
        net.load_state_dict(torch.load(self.folder / "mnist_net.pt", weights_only=True))
        return net.eval()

    def cal_batches(self, bs=32):
        return list(self.cal.split(bs))

    def mnist_cal_batches(self, bs=64):
        return list(self.mnist_cal.split(bs)) if self.has_mnist else None


def logits_of(fn, x, bs=32) -> tuple[np.ndarray, float]:
    """Run ``fn`` over ``x`` in batches; returns the logits and the seconds per batch of ``bs``."""
    outs, t = [], 0.0
    with torch.no_grad():
        for b in x.split(bs):
            t0 = time.perf_counter()
            o = fn(b)
            t += time.perf_counter() - t0
            outs.append(o.detach().float().numpy() if torch.is_tensor(o) else np.asarray(o, dtype=np.float32))
    return np.concatenate(outs), t / max(1, len(x) / bs)


class Recorder:
    """Collects rows; every row records wall time, load average and threads, and never aborts the run.

    With ``KEEP_OTHER_ROWS`` the rows an earlier run left in ``results.json`` stay, except those of the
    row ids this run records again."""

    def __init__(self, peer: str, version: str, out, data: Data):
        self.peer, self.version, self.out, self.data = peer, version, Path(out), data
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows = []
        self.fp32_s = {}
        old = self.out / "results.json"
        self.kept = json.loads(old.read_text())["rows"] if KEEP_OTHER_ROWS and old.exists() else []

    def fp32_time(self, key, fn, x):
        if key not in self.fp32_s:
            self.fp32_s[key] = logits_of(fn, x)[1]
        return self.fp32_s[key]

    def row(self, row: str, method: str, run, note: str = ""):
        """``run()`` returns ``dict(seconds=..., imagenet=fn or None, mnist=fn or None, fp32=fn, mnist_fp32=fn)``
        where each fn maps a batch to logits, or raises; a failing row is recorded with its error."""
        rec = {"row": row, "method": method, "note": note, "load_average": os.getloadavg()[0], "threads": THREADS}
        tag = f"{row}.{sum(r['row'] == row for r in self.rows)}"  # a peer may have several methods per row
        self.kept = [r for r in self.kept if r["row"] != row]
        print(f"[{self.peer}] {ROWS.get(row, row)}: {method} ...", flush=True)
        try:
            r = run()
            rec["seconds"] = r["seconds"]
            rec["note"] = r.get("note", note)
            if r.get("imagenet") is not None:
                logits, per_batch = logits_of(r["imagenet"], self.data.ev)
                np.save(self.out / f"{tag}.imagenet.npy", logits)
                rec["imagenet_logits"] = f"{tag}.imagenet.npy"
                if r.get("fp32") is not None:
                    rec["forward_ratio"] = per_batch / self.fp32_time("imagenet", r["fp32"], self.data.ev)
            if r.get("mnist") is not None:
                logits, _ = logits_of(r["mnist"], self.data.mnist_ev, bs=250)
                np.save(self.out / f"{tag}.mnist.npy", logits)
                rec["mnist_logits"] = f"{tag}.mnist.npy"
                rec["mnist_seconds"] = r.get("mnist_seconds")
        except Exception as e:  # a peer that cannot do a row is reported, not fatal
            rec["error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"[:400]
            traceback.print_exc()
        self.rows.append(rec)
        self.save()

    def save(self):
        doc = {"peer": self.peer, "version": self.version, "rows": self.kept + self.rows}
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.out / "results.json")


def main_args():
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row ids")
    ap.add_argument("--adaround-iterations", type=int, default=None)
    a = ap.parse_args()
    a.rows = a.rows.split(",")
    return a


def pair(data: Data, model, mnist, make, note=None):
    """A row's ``run()`` for :meth:`Recorder.row`: ``make(float_model, calibration_batches)`` returns the
    quantized model; it runs on MobileNetV2 (the timed one) and on the MNIST net. ``note(seconds)``, if
    given, is called afterwards for the row's note."""
    def run():
        qm, t = timed(lambda: make(model, data.cal_batches()))
        mq, mt = timed(lambda: make(mnist, data.mnist_cal_batches())) if mnist is not None else (None, None)
        r = dict(seconds=t, imagenet=qm, fp32=model, mnist=mq, mnist_seconds=mt)
        if note is not None:
            r["note"] = note(t)
        return r
    return run


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0
