"""One self-contained ``report.html`` per run: tables, and plots embedded as inline SVG (no network, no files).

:func:`html_report` takes what a run produced -- fidelity rows per configuration, a sim (its cost model and
summary), an :class:`~edgequant.analysis.AnalysisReport` (sensitivity ranking, histograms of the worst
tensors against their grids), a mixed-precision result (its Pareto front) and the files written -- and
returns the page; every section is optional. Plots are drawn with matplotlib (the ``report`` extra) into
SVG text; without matplotlib the page keeps its tables and says that plots need it.

>>> page = html_report("demo", rows=[{"config": "w8a8", "sqnr_db": 31.2}], files=["model.onnx"])
>>> page.startswith("<!DOCTYPE html>") and "w8a8" in page and "model.onnx" in page
True
"""
from __future__ import annotations

import datetime
import html
import io
from typing import Optional

import torch

from ..batches import evaluating, run_batch, to_device
from ..core.quant import grid_range
from ..nn.quantizer import Quantizer

_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}h2{border-bottom:1px solid #ddd}
.plot svg{max-width:100%;height:auto}.note{color:#666}td.t{text-align:left}"""


def _esc(v) -> str:
    return html.escape(str(v))


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if v != v else (f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}")
    return "-" if v is None else str(v)


def table(rows: list[dict], columns: Optional[list[str]] = None) -> str:
    """An HTML table of ``rows`` (dicts), with ``columns`` (default: every key, in first-seen order)."""
    if not rows:
        return "<p class='note'>(nothing)</p>"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    def cell(v):
        kind = "" if isinstance(v, (int, float)) else " class='t'"
        return f"<td{kind}>{_esc(_fmt(v))}</td>"
    body = "".join("<tr>" + "".join(cell(r.get(c)) for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    text = buf.getvalue()
    return f"<div class='plot'>{text[text.index('<svg'):]}</div>"


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def sensitivity_chart(analysis, k: int = 20) -> str:
    """Bar chart: SQNR with only each of the ``k`` worst quantizers enabled (lower = costs more)."""
    plt = _pyplot()
    worst = analysis.worst(k)
    if plt is None or not worst:
        return ""
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(worst) + 1))
    names = [q.name for q in worst][::-1]
    ax.barh(names, [q.only_sqnr_db for q in worst][::-1], color=["#c44" if q.role == "weight" else "#48c" for q in worst][::-1])
    ax.axvline(analysis.all_sqnr_db, color="k", ls="--", lw=1, label=f"all enabled ({analysis.all_sqnr_db:.1f})")
    ax.set_xlabel("score with only this quantizer enabled (red: weights, blue: activations)")
    ax.legend(loc="lower right", fontsize=8)
    return _svg(fig)


@torch.no_grad()
def tensor_histograms(sim, names: list[str], batches, bins: int = 120) -> dict:
    """``{name: (values, lo, hi, step)}``: a sample of each quantizer's input (the weight, or what the
    activation quantizer sees on ``batches``) and its grid's float range and step."""
    qs = sim.quantizers()
    seen: dict[str, list] = {n: [] for n in names if n in qs and not qs[n].is_weight}
    hooks = [qs[n].register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach().float().flatten()[:20000].cpu()))
             for n in seen]
    try:
        with evaluating(sim):
            for b in batches:
                run_batch(sim, to_device(b, sim.device), sim._n_positional)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n in names:
        q = qs.get(n)
        if not isinstance(q, Quantizer) or not q.is_initialized:
            continue
        x = sim.model.get_parameter(n).detach().float().flatten().cpu() if q.is_weight else (torch.cat(seen[n]) if seen[n] else None)
        if x is None:
            continue
        lo, hi = grid_range(q.scale.detach().cpu(), q.zero_point.cpu(), q.qmin, q.qmax)
        out[n] = (x, float(lo.min()), float(hi.max()), float(q.scale.detach().reshape(-1)[0]))
    return out


def histogram_plots(hists: dict, bins: int = 120) -> str:
    """One small histogram per tensor with its grid's range (dashed) and the share outside it."""
    plt = _pyplot()
    if plt is None or not hists:
        return ""
    n = len(hists)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, (x, lo, hi, step)) in zip(axes.flat, hists.items()):
        ax.hist(x.numpy(), bins=bins, color="#888", log=True)
        for v in (lo, hi):
            ax.axvline(v, color="#c44", ls="--", lw=1)
        outside = float(((x < lo - step / 2) | (x > hi + step / 2)).float().mean())
        ax.set_title(f"{name}\nstep {step:.3g}, outside the grid {outside:.2%}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return _svg(fig)


def pareto_plot(mixed) -> str:
    """The mixed-precision front: score against bit operations (share of all-high), the chosen point marked."""
    plt = _pyplot()
    if plt is None or not getattr(mixed, "front", None):
        return ""
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p.bops / mixed.high_bops for p in mixed.front]
    ax.plot(xs, [p.score for p in mixed.front], "o-", ms=3, label="front")
    if mixed.chosen is not None:
        ax.plot([mixed.chosen.bops / mixed.high_bops], [mixed.chosen.score], "r*", ms=12, label="chosen")
    ax.set_xlabel("bit operations (share of all-high)")
    ax.set_ylabel("score")
    ax.legend(fontsize=8)
    return _svg(fig)


def curves_plot(compressed, k: int = 12) -> str:
    """Compression's selection curves: each candidate layer's score alone at each ratio (the ``k`` layers that
    lose most at their smallest ratio), the chosen ratio of each marked."""
    plt = _pyplot()
    if plt is None or not getattr(compressed, "curves", None):
        return ""
    chosen = {c.name: c.ratio for c in compressed.layers}
    worst = sorted(compressed.curves, key=lambda n: min(s for _, s in compressed.curves[n]))[:k]
    fig, ax = plt.subplots(figsize=(7, 4))
    for n in worst:
        pts = sorted(compressed.curves[n])
        (line,) = ax.plot([r for r, _ in pts], [s for _, s in pts], "o-", ms=3, lw=1, label=n)
        pick = [s for r, s in pts if r == chosen.get(n)]
        if pick:
            ax.plot([chosen[n]], pick, "*", ms=11, color=line.get_color())
    ax.set_xlabel("ratio kept (of the layer's MACs or channels)")
    ax.set_ylabel("score with only this layer compressed")
    ax.legend(fontsize=6, ncol=2)
    return _svg(fig)


def compression_section(compressed) -> list[str]:
    """The compression part of the report: totals, the curves, the choice per layer."""
    layers = [{"layer": c.name, "kind": c.kind, "ratio": c.ratio, "rank / channels": c.rank, "MACs before": c.macs_before,
               "MACs after": c.macs_after, "params before": c.params_before or "", "params after": c.params_after or ""}
              for c in compressed.layers]
    return ["<h2>Compression</h2>", f"<p>{_esc(str(compressed))}</p>", curves_plot(compressed),
            table(sorted(layers, key=lambda r: r["ratio"]))]


def html_report(title: str, *, header: Optional[dict] = None, rows: Optional[list[dict]] = None, sim=None,
                analysis=None, histograms: Optional[dict] = None, mixed=None, compressed=None,
                files: Optional[list[str]] = None, notes: Optional[list[str]] = None) -> str:
    """The page (see the module docstring); every argument but ``title`` is optional."""
    parts = [f"<h1>{_esc(title)}</h1>", f"<p class='note'>edgequant report, {datetime.datetime.now():%Y-%m-%d %H:%M}</p>"]
    if header:
        parts.append(table([{"": k, "value": v} for k, v in header.items()], ["", "value"]))
    if rows:
        parts += ["<h2>Fidelity per configuration</h2>", table(rows)]
    plots_missing = _pyplot() is None
    if compressed is not None:
        parts += compression_section(compressed)
    if analysis is not None:
        parts += ["<h2>Sensitivity ranking</h2>",
                  f"<p>all quantizers enabled: {analysis.all_sqnr_db:.2f} ({_esc(analysis.score)}); "
                  f"{len(analysis.quantizers)} quantizers in {analysis.seconds:.1f} s</p>",
                  sensitivity_chart(analysis),
                  table([{"rank": i, "quantizer": q.name, "role": q.role, "bits": q.bits, "only it": q.only_sqnr_db,
                          "all but it": q.all_but_sqnr_db, "clipped": q.clipped, "suggestion": q.suggestion}
                         for i, q in enumerate(analysis.worst(20), 1)])]
    if histograms:
        parts += ["<h2>Worst tensors against their grids</h2>", histogram_plots(histograms)]
    if mixed is not None:
        parts += ["<h2>Mixed precision</h2>", pareto_plot(mixed),
                  table([{"bit-ops share": p.bops / mixed.high_bops, "score": p.score, "lowered": len(p.lowered),
                          "chosen": "yes" if p is mixed.chosen else ""} for p in mixed.front])]
    if sim is not None:
        c = sim.cost()
        parts += ["<h2>Cost model</h2>",
                  table([{"MACs": c.total("macs"), "bit operations": c.total("bops"), "weight bytes": c.total("weight_bytes"),
                          "peak activation bytes": c.peak_activation_bytes, "energy (uJ)": c.total("energy_pj") / 1e6}]),
                  table([{"layer": lc.name, "kind": lc.kind, "MACs": lc.macs, "w bits": lc.weight_bits, "in bits": lc.input_bits,
                          "bit-ops": lc.bops, "weight bytes": lc.weight_bytes} for lc in c.layers]),
                  "<h2>Quantizers</h2>", f"<pre>{_esc(sim.summary())}</pre>"]
    if files:
        parts += ["<h2>Files written</h2>", "<ul>" + "".join(f"<li>{_esc(f)}</li>" for f in files) + "</ul>"]
    if notes:
        parts += ["<h2>Notes</h2>"] + [f"<p>{_esc(n)}</p>" for n in notes]
    if plots_missing:
        parts.append("<p class='note'>plots need matplotlib: pip install 'edgequant[report]'</p>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(title)}</title><style>{_CSS}</style></head>"
            f"<body>{''.join(parts)}</body></html>")
