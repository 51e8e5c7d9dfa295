"""NNCF's ``nncf.quantize`` of all-MiniLM-L6-v2 on the sentences of ``bench_transformers.py``, fed as its
documentation says for transformers (``model_type=nncf.ModelType.TRANSFORMER``, a dataset of single
samples). Prints one JSON line per split: mean embedding cosine to FP32 and nearest-neighbour agreement.

Usage (in NNCF's environment): .peers/venvs/nncf/bin/python benchmarks/peers/run_nncf_minilm.py
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nncf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_transformers import SEQ, embed, fidelity  # noqa: E402

from edgequant.data import sentence_split  # noqa: E402
from edgequant.models import minilm_l6_v2, tokenize  # noqa: E402


def main():
    torch.set_num_threads(2)
    enc, tok = minilm_l6_v2()
    for seed in (0, 1):
        cal_s, ev_s = sentence_split(128, 128, seed=seed)
        ids, mask = tokenize(tok, cal_s, SEQ)
        items = [(ids[i:i + 1], mask[i:i + 1]) for i in range(len(ids))]
        dataset = nncf.Dataset(items, lambda item: item)
        t = time.perf_counter()
        q = nncf.quantize(enc, dataset, subset_size=len(items), model_type=nncf.ModelType.TRANSFORMER).eval()
        seconds = time.perf_counter() - t
        eids, emask = tokenize(tok, ev_s, SEQ)
        ev = [(eids[i:i + 16], emask[i:i + 16]) for i in range(0, len(eids), 16)]
        cos, nn_agree = fidelity(embed(enc, ev), embed(q, ev))
        print(json.dumps({"peer": "nncf", "version": nncf.__version__, "seed": seed, "cosine": cos,
                          "nn_agreement": nn_agree, "seconds": round(seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
