"""AIMET (aimet-torch 2.42) compression: spatial SVD with its greedy per-layer ratio selection, on the MNIST CNN
that ``bench_compress.py`` trains, to a fraction of the model's MACs.

Its documented use (``ModelCompressor.compress_model``): ``CompressionScheme.spatial_svd``, ``CostMetric.mac``,
``SpatialSvdParameters`` in auto mode with ``GreedySelectionParameters(target_comp_ratio, num_comp_ratio_candidates=10)``
and an ``eval_callback(model, iterations, use_cuda) -> accuracy``; here the accuracy on the same 256 training
digits edgequant's selection scores on (edgequant scores output SQNR against the original, AIMET an accuracy, as
each documents). Run by ``bench_compress.py --part peers`` in AIMET's environment.

    python run_compress_aimet.py <mnist_inputs.pt> <out.json> [--target 0.5]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
from aimet_torch.common.defs import CompressionScheme, CostMetric, GreedySelectionParameters  # noqa: E402
from aimet_torch.compress import ModelCompressor  # noqa: E402
from aimet_torch.defs import SpatialSvdParameters  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs")
    ap.add_argument("out")
    ap.add_argument("--target", type=float, default=0.5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from bench_compress import mnist_cnn
    from edgequant.compress.select import model_macs

    data = torch.load(args.inputs)
    net = mnist_cnn()
    net.load_state_dict(data["state_dict"])
    net.eval()
    xs, ys, xte, yte = data["score_x"], data["score_y"], data["test_x"], data["test_y"]

    def acc(m, x, y):
        with torch.no_grad():
            return float(torch.cat([m(b).argmax(1) for b in x.split(500)]).eq(y).float().mean())

    def evaluate(model, iterations, use_cuda=False):
        return acc(model.eval(), xs, ys)

    params = SpatialSvdParameters(SpatialSvdParameters.Mode.auto, SpatialSvdParameters.AutoModeParams(
        GreedySelectionParameters(target_comp_ratio=args.target, num_comp_ratio_candidates=10)))
    cwd = os.getcwd()
    os.chdir(tempfile.mkdtemp())  # AIMET writes its eval-score pickle to ./data
    try:
        t0 = time.perf_counter()
        compressed, stats = ModelCompressor.compress_model(net, evaluate, 1, (1, 1, 28, 28), CompressionScheme.spatial_svd,
                                                           CostMetric.mac, params)
        sec = time.perf_counter() - t0
    finally:
        os.chdir(cwd)

    row = {"peer": "aimet", "target": args.target, "macs": model_macs(compressed, xte[:1]) / model_macs(net, xte[:1]), "acc_before": acc(net, xte, yte),
           "acc": acc(compressed, xte, yte), "seconds": sec, "aimet_mac_ratio": float(stats.mac_compression_ratio),
           "layer_ratios": {p.name: None if p.compression_ratio is None else float(p.compression_ratio) for p in stats.per_layer_stats},
           "method": "ModelCompressor.compress_model(spatial_svd, mac, greedy selection, 10 candidates per layer)"}
    print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps([row], indent=1))


if __name__ == "__main__":
    main()
