"""Which kernels ONNX Runtime runs for edgequant's export of one torchvision model: the sim's quantizer count, the ops
it leaves in float, and the op types of ORT's optimized graph (integer ``QGemm`` / ``QLinearMatMul`` / ``QLinearConv``
against float ``MatMul`` / ``Gemm`` / ``Conv``).

Usage: python benchmarks/ort_kernels.py vit_b_16 [--size 224]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from collections import Counter

import onnx
import onnxruntime as ort
import torch
import torchvision

from edgequant import QuantSim, export_onnx

KERNELS = ("QGemm", "QLinearMatMul", "QLinearConv", "MatMulInteger", "MatMul", "Gemm", "Conv", "FusedMatMul")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    torch.manual_seed(0)
    warnings.simplefilter("ignore")
    model = torchvision.models.get_model(args.model, weights=None).eval()
    x = torch.randn(1, 3, args.size, args.size)
    sim = QuantSim(model, x, "w8a8")
    sim.calibrate([x], progress=False)
    tmp = tempfile.mkdtemp(prefix="edgequant_kernels_")
    path = export_onnx(sim, os.path.join(tmp, f"{args.model}.onnx"))["onnx"]
    so = ort.SessionOptions()
    so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    kinds = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    print(f"{args.model}: {len(sim.quantizers())} quantizers, {len(sim.unsupported)} ops left in float; ORT kernels: "
          + ", ".join(f"{k} {kinds[k]}" for k in KERNELS if kinds[k]))


if __name__ == "__main__":
    main()
