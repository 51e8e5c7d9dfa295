"""How long `edgequant --help` takes in a fresh process, against importing torch alone (what it cost before
the CLI stopped importing torch at start-up). Prints the median of several runs and the ratio.

    python benchmarks/bench_cli.py [--repeats 5]
"""
import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _time(cmd, repeats):
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    exe = Path(sys.executable).parent / "edgequant"
    rows = [("edgequant --help", [str(exe), "--help"]), ("edgequant quantize --help", [str(exe), "quantize", "--help"]),
            ("python -c 'import torch'", [sys.executable, "-c", "import torch"])]
    times = {name: _time(cmd, args.repeats) for name, cmd in rows}
    for name, t in times.items():
        print(f"{name:<28} {t * 1000:8.0f} ms (median of {args.repeats})")
    print(f"--help / import torch: {times['edgequant --help'] / times[rows[2][0]]:.2f}")


if __name__ == "__main__":
    main()
