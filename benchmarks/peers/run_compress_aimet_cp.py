"""AIMET (aimet-torch 2.42) channel pruning of MobileNetV2 (ImageNet weights, BN folded as for edgequant's rows)
to fractions of the MACs, with its greedy per-layer ratio selection.

Its documented use (``ModelCompressor.compress_model``): ``CompressionScheme.channel_pruning``, ``CostMetric.mac``,
``ChannelPruningParameters(data_loader, num_reconstruction_samples, allow_custom_downsample_ops=False, mode=auto,
AutoModeParams(GreedySelectionParameters(target_comp_ratio, num_comp_ratio_candidates), modules_to_ignore))`` on
the model as AIMET's ``prepare_model`` leaves it, and an ``eval_callback(model, iterations, use_cuda) -> accuracy``.
Candidates as edgequant's: the layers are the consumers of edgequant's prunable chains (MobileNetV2's projection
convs; every other ungrouped conv in ``modules_to_ignore``) and 5 ratio candidates (edgequant scores 5 ratios per
chain) -- AIMET over all 52 ungrouped convs at its example's 10 candidates took about 30 s per trial here (hours).
The data: the same calibration crops edgequant reconstructs from (a DataLoader of batches of 16; AIMET samples 10
positions per image, so ``num_reconstruction_samples`` = 10 x the number of crops); the callback returns the top-1
agreement with FP32 on the 32 crops edgequant's selection scores on (no labels: the photos are unlabelled). The
first target's per-layer evaluations are saved and reused for the next targets (``saved_eval_scores_dict``), as
edgequant reuses its curves. Run by ``bench_compress.py --part peers`` in AIMET's environment.

    python run_compress_aimet_cp.py <inputs.pt> <out.json> [--targets 0.9,0.8,0.7]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from aimet_torch.common.defs import CompressionScheme, CostMetric, GreedySelectionParameters  # noqa: E402
from aimet_torch.compress import ModelCompressor  # noqa: E402
from aimet_torch.defs import ChannelPruningParameters  # noqa: E402
from aimet_torch.model_preparer import prepare_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs")
    ap.add_argument("out")
    ap.add_argument("--targets", default="0.9,0.8,0.7")
    ap.add_argument("--candidates", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from edgequant.compress.prune import prunable_chains
    from edgequant.compress.select import model_macs
    from edgequant.metrics import fidelity
    from edgequant.models import mobilenet_v2_imagenet
    from edgequant.ptq import fold_batch_norms

    data = torch.load(args.inputs)
    cx, ev = data["calibration"], data["evaluation"]
    base, _ = fold_batch_norms(mobilenet_v2_imagenet().eval())
    score_x = cx[:32]
    with torch.no_grad():
        ref = torch.cat([base(t) for t in ev.split(32)])
        score_ref = base(score_x).argmax(1)
    macs0 = model_macs(base, cx[:1])
    chains = set(prunable_chains(base, cx[:1]))
    # AIMET's loaders yield (inputs, labels); the labels are never read by channel pruning
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(cx, torch.zeros(len(cx), dtype=torch.long)),
                                         batch_size=16, shuffle=False)

    def evaluate(model, iterations, use_cuda=False):
        with torch.no_grad():
            return float(model.eval()(score_x).argmax(1).eq(score_ref).float().mean())

    work = Path(tempfile.mkdtemp())
    saved = None
    rows = []
    cwd = os.getcwd()
    os.chdir(work)  # AIMET writes its eval-score pickle to ./data
    try:
        for target in (float(t) for t in args.targets.split(",")):
            # AIMET's winnow cannot pass torchvision's functional adaptive_avg_pool2d: its model preparer (fx) makes
            # functionals modules first, as its documentation asks of any model
            model = prepare_model(fold_batch_norms(mobilenet_v2_imagenet().eval())[0])
            # the candidates: the consumers of edgequant's chains (MobileNetV2's projection convs), the rest
            # ignored -- AIMET's greedy over all 52 ungrouped convs at 10 candidates takes hours on 2 cores
            ignore = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1 and n not in chains]
            found = {n for n, m in model.named_modules() if n in chains}
            if found != chains:
                raise SystemExit(f"prepare_model renamed the candidate convs: {sorted(chains - found)[:3]}")
            params = ChannelPruningParameters(
                loader, 10 * len(cx), False, ChannelPruningParameters.Mode.auto,
                ChannelPruningParameters.AutoModeParams(
                    GreedySelectionParameters(target_comp_ratio=target, num_comp_ratio_candidates=args.candidates,
                                              saved_eval_scores_dict=saved), modules_to_ignore=ignore))
            t0 = time.perf_counter()
            try:
                compressed, stats = ModelCompressor.compress_model(model, evaluate, 1, (1, 3, 224, 224),
                                                                   CompressionScheme.channel_pruning, CostMetric.mac, params)
            except Exception as e:  # noqa: BLE001 -- recorded as the peer's result
                rows.append({"peer": "aimet", "target": target, "error": f"{type(e).__name__}: {e}",
                             "trace": traceback.format_exc()[-2000:]})
                print(json.dumps(rows[-1]), flush=True)
                break
            sec = time.perf_counter() - t0
            pkl = work / "data" / "greedy_selection_eval_scores_dict.pkl"
            if saved is None and pkl.exists():
                saved = str(pkl)
            with torch.no_grad():
                f = fidelity(ref, torch.cat([compressed(t) for t in ev.split(32)]))
            rows.append({"peer": "aimet", "target": target, "macs": model_macs(compressed, cx[:1]) / macs0,
                         "top1": f.top1, "sqnr_db": f.sqnr_db, "seconds": sec,
                         "aimet_mac_ratio": float(stats.mac_compression_ratio),
                         "method": f"ModelCompressor.compress_model(channel_pruning, mac, greedy selection, "
                                   f"the {len(chains)} convs edgequant prunes (its chains' consumers), {args.candidates} candidates per layer, {10 * len(cx)} "
                                   "reconstruction samples), "
                                   "no fine-tune" + (" (seconds: the greedy search)" if len(rows) == 0 else
                                                     " (seconds: reusing its saved evaluations)")})
            print(json.dumps(rows[-1]), flush=True)
            Path(args.out).write_text(json.dumps(rows, indent=1))
    finally:
        os.chdir(cwd)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
