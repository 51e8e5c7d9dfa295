"""What the mixed-precision peer runners share: the saved model and data, and their command line."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def load(folder: Path):
    """``(folded MobileNetV2, calibration crops, evaluation crops, FP32 logits on them, FP32 calibration logits)``."""
    from edgequant.models import mobilenet_v2_imagenet
    from edgequant.ptq import fold_batch_norms

    model = fold_batch_norms(mobilenet_v2_imagenet().eval())[0].eval()
    model.load_state_dict(torch.load(folder / "model_folded.pt", weights_only=True))
    ld = lambda n: torch.load(folder / n, weights_only=True)  # noqa: E731
    return model, ld("calibration.pt"), ld("evaluation.pt"), ld("fp32_logits.pt"), ld("fp32_calibration_logits.pt")


def runner_args(peer: str, version: str):
    """``(folder, targets, out, save)``: the command line of a runner and its result record."""
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--targets", default="0.5,0.75")
    args = ap.parse_args()
    folder = Path(args.folder)
    out = {"peer": peer, "version": version, "rows": []}
    return folder, [float(t) for t in args.targets.split(",")], out, lambda: (folder / f"{peer}.json").write_text(json.dumps(out, indent=1))
