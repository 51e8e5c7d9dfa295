"""The verdict the CLI prints and writes: fidelity to the float model, size, ONNX Runtime's agreement."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click

#: column -> (header, format); the headers say what each number is
COLUMNS = {
    "top1": ("top-1 agreement with FP32", "{:.1%}"),
    "top1_confident": ("(confident inputs)", "{:.1%}"),
    "top5": ("top-5 overlap", "{:.1%}"),
    "sqnr_db": ("logit SQNR dB", "{:.2f}"),
    "kl": ("KL", "{:.4f}"),
    "ort_top1_same_as_sim": ("ONNX Runtime top-1 = sim", "{:.1%}"),
    "ort_vs_sim_sqnr_db": ("ONNX Runtime vs sim SQNR dB", "{:.1f}"),
    "size_mb": ("size MB", "{:.2f}"),
    "seconds": ("seconds", "{:.1f}"),
}


def batches(x, batch_size: int):
    return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]


def logits(model, x, batch_size: int, device=None, desc: str = "evaluating"):
    """The model's outputs on ``x``, batch by batch, under a progress bar named ``desc``."""
    import torch
    from tqdm.auto import tqdm

    with torch.no_grad():
        return torch.cat([model(b.to(device) if device is not None else b).float().cpu()
                          for b in tqdm(batches(x, batch_size), desc=desc, unit="batch", leave=False)])


def row(name: str, ref, out, size_mb: float, seconds: float, **extra) -> dict:
    """One line of the verdict: fidelity of ``out`` to the float model's logits ``ref``."""
    from ..metrics import fidelity, sqnr_db

    if ref.ndim == 2:
        fid = fidelity(ref, out).as_dict()
    else:  # not a classifier: SQNR only
        fid = {"sqnr_db": sqnr_db(ref, out)}
    return {"config": name, **fid, "size_mb": size_mb, "seconds": seconds, **extra}


def _cell(column: str, value) -> str:
    if value is None or (isinstance(value, float) and value != value):  # missing, or NaN (no confident inputs)
        return "-"
    return (COLUMNS[column][1] if column in COLUMNS else "{}").format(value)


def print_table(rows: list[dict], extra: tuple[str, ...] = ()) -> None:
    cols = [c for c in COLUMNS if any(c in r for r in rows)] + list(extra)
    heads = ["model"] + [COLUMNS[c][0] if c in COLUMNS else c for c in cols]
    cells = [[r["config"]] + [_cell(c, r.get(c)) for c in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(heads, widths)))
    for c in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def markdown(rows: list[dict], header: dict, extra: tuple[str, ...] = ()) -> str:
    cols = [c for c in COLUMNS if any(c in r for r in rows)] + list(extra)
    lines = [f"# edgequant report: {header.get('model', '')}", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k != "model"]
    lines += ["", "| model | " + " | ".join(COLUMNS[c][0] if c in COLUMNS else c for c in cols) + " |",
              "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        vals = [_cell(c, r.get(c)) for c in cols]
        lines.append(f"| {r['config']} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def write_report(folder: Path, rows: list[dict], header: dict, extra: tuple[str, ...] = (), **html) -> Path:
    """report.json, report.md and the self-contained report.html (``html``: what else it shows -- ``sim``,
    ``analysis``, ``histograms``, ``mixed``, ``compressed``, ``notes``; see :func:`edgequant.analysis.html.html_report`);
    returns the path of report.html."""
    from ..analysis.html import html_report
    from ..io.encodings import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "report.json", json.dumps({**header, "results": rows}, indent=2, default=str))
    atomic_write_text(folder / "report.md", markdown(rows, header, extra))
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) + ["report.html"]
    page = html_report(f"edgequant report: {header.get('model', '')}", header={k: v for k, v in header.items() if k != "model"},
                       rows=rows, files=files, **html)
    atomic_write_text(folder / "report.html", page)
    return folder / "report.html"


def sensitivity(sim, data, progress: bool = True):
    """``(analysis, histograms)`` of a calibrated sim for the report: each quantizer's cost scored on ``data``
    (a few batches), and histograms of the six worst tensors against their grids."""
    from ..analysis import analyze
    from ..analysis.html import tensor_histograms

    analysis = analyze(sim, None, eval_data=data, progress=progress)
    return analysis, tensor_histograms(sim, [q.name for q in analysis.worst(6)], data)


def onnx_runtime(path, x, batch_size: int, threads: int = 0):
    """Outputs of the ONNX model at ``path`` in ONNX Runtime (CPU) on ``x``."""
    import numpy as np
    import onnxruntime as ort
    import torch

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(os.fspath(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: b.cpu().numpy()})[0] for b in batches(x, batch_size)]
    return torch.from_numpy(np.concatenate(outs))


def latency_ms(path, x1, threads: int, repeats: int = 20) -> float:
    """Median ONNX Runtime latency (ms) of one run on ``x1``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(os.fspath(path), so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x1.cpu().numpy()}
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def ort_agreement(ort_out, sim_out) -> dict:
    """How ONNX Runtime's outputs agree with the sim's: same top-1, SQNR of ORT against the sim."""
    from ..metrics import sqnr_db

    same = float((ort_out.argmax(-1) == sim_out.argmax(-1)).float().mean()) if sim_out.ndim == 2 else None
    return {"ort_top1_same_as_sim": same, "ort_vs_sim_sqnr_db": sqnr_db(sim_out, ort_out)}
