"""Two coverage runs side by side: the raw results (``--results`` JSON lines) of ``bench_coverage.py`` on the same
machine, for example before and after a change, as one markdown table (the models both runs hold).

Per model: the stage each run stopped at ("done": all stages), the fraction of outputs the integer-exact sim and
ONNX Runtime compute identically (default export, and with ``tables=True, float64=True``; "-" where the run stopped
before that stage, 1 where it passed it) and the ORT-vs-sim logit SQNR. A summary line counts each stage column.

Usage: python benchmarks/coverage_compare.py BEFORE.jsonl AFTER.jsonl [--before LABEL] [--after LABEL] [--out FILE.md]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ort_latency import emit


def _rows(path: str) -> dict:
    rows = {}
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        rows[r["model"]] = r  # a later line for the same model replaces the earlier one
    return rows


def _cells(r: dict | None) -> tuple[str, str, str, str]:
    if r is None:
        return "-", "-", "-", "-"
    stage = r.get("stage", "?")

    def frac(key):
        v = r.get(key)
        return "1" if stage == "done" else ("-" if v is None else f"{v:.4f}".rstrip("0").rstrip("."))
    sqnr = r.get("ort_sqnr_db")
    return stage, frac("identical_fraction"), frac("identical_exact"), "-" if sqnr is None else f"{sqnr:.1f}"


def table(before: dict, after: dict, labels: tuple[str, str]) -> list[str]:
    b, a = labels
    lines = [f"| model | stage {b} | stage {a} | identical {b} | identical {a} | with options {b} | with options {a} "
             f"| ORT-vs-sim dB {b} | ORT-vs-sim dB {a} |", "|---|---|---|---|---|---|---|---|---|"]
    both = [m for m in after if m in before]  # a rerun of a few models compares those
    before, after = {m: before[m] for m in both}, {m: after[m] for m in both}
    for m in both:
        x, y = _cells(before[m]), _cells(after[m])
        lines.append(f"| {m} | {x[0]} | {y[0]} | {x[1]} | {y[1]} | {x[2]} | {y[2]} | {x[3]} | {y[3]} |")

    def count(rows, test):
        return sum(1 for r in rows.values() if test(r))
    done = (lambda r: r.get("stage") == "done")
    exact = (lambda r: r.get("stage") == "done" or r.get("identical_exact") == 1.0)
    lines += ["", f"All stages: {count(before, done)} / {len(before)} {b}, {count(after, done)} / {len(after)} {a}; "
                  f"integer-exact = ORT with the options: {count(before, exact)} {b}, {count(after, exact)} {a}."]
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--before-label", default="before")
    ap.add_argument("--after-label", default="after")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    emit(table(_rows(args.before), _rows(args.after), (args.before_label, args.after_label)), args.out)


if __name__ == "__main__":
    main()
