"""AIMET (aimet-torch 2.42) Automatic Mixed Precision on the BN-folded MobileNetV2, under bit-operation targets.

Entry points, all documented: ``aimet_torch.quantsim.QuantizationSimModel`` (tf_enhanced ranges,
``config_file=None``: per-channel weights, as ``run_aimet.py``) built at the high candidate (16-bit
activations, 8-bit parameters), ``compute_encodings``, and ``aimet_torch.mixed_precision.choose_mixed_precision``
(the 2.x home of AMP; ``aimet_torch.amp`` holds only its internals) with

* candidates ``[((16, int), (8, int)), ((8, int), (4, int))]``: W8A16 and W4A8, exactly edgequant's pair;
* ``eval_callback_for_phase1`` = ``eval_callback_for_phase2``: the logit SQNR (dB) against the FP32 logits on
  the first 32 calibration crops, the score edgequant's own search uses;
* the callbacks wrapped in ``aimet_torch.common.defs.CallbackFunc`` (2.42 reads ``.func`` / ``.args``);
* ``forward_pass_callback``: the 64 calibration crops (4 batches of 16);
* ``allowed_accuracy_drop=None`` (AMP has no bit-operation target, it stops at an accuracy drop; with
  ``None`` its phase 2 runs to the end of its list) and its default ``AMPSearchAlgo.Binary``. The whole
  front (``BruteForce``) was tried first: AMP recomputes the encodings (a pass over the 64 crops) before
  scoring each of its 82 points, about 25 s a point here, 35 minutes, past this benchmark's time box.

For a target t the runner takes AMP's phase-2 list (phase 1's ranking, read from AMP's cache
``results_dir/.cache/accuracy_list.pkl``: the cumulative points, least sensitive group first), counts each
point's bit operations (below; no evaluation), and takes the first point within t of the all-high count --
the best one within budget under AMP's own assumption that scores fall along its list. The sim is put in
that state the way AMP's phase 2 does it (each group's quantizers set to its candidate's bitwidths, then
``compute_encodings``); the reported seconds are the one ``choose_mixed_precision`` call plus that step.

Held-out metrics are ``edgequant.metrics.fidelity`` on the 64 evaluation crops for that sim. Bit operations are counted
here, not taken from AIMET: forward hooks on the sim with one crop give each conv/linear its MACs (output
elements x weight elements per output channel, ``edgequant.sim.cost``'s formula), its weight quantizer's
bitwidth and the bitwidth of the quantizer that produced its input (its own input quantizer if enabled,
else the activation quantizer whose output tensor it consumes, else -- an input reached through an
unquantized functional op, torchvision's pooling before the classifier -- the last activation quantizer
run before it); the sum of MACs x weight bits x activation bits.

    python run_mixed_aimet.py .peers/mixed --targets 0.5,0.75
"""
from __future__ import annotations

import os
import pickle
import sys
import time
import traceback
from pathlib import Path

import torch
from mixed_common import load, runner_args

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import aimet_torch
from aimet_torch.common.amp.utils import AMPSearchAlgo
from aimet_torch.common.defs import CallbackFunc, QuantizationDataType, QuantScheme
from aimet_torch.mixed_precision import choose_mixed_precision
from aimet_torch.quantsim import QuantizationSimModel
from torch import nn

BATCH = 16
HIGH = ((16, QuantizationDataType.int), (8, QuantizationDataType.int))
LOW = ((8, QuantizationDataType.int), (4, QuantizationDataType.int))


def _bits(q):
    return int(q.bitwidth) if q is not None else 32


@torch.no_grad()
def bit_ops(sim_model: nn.Module, x: torch.Tensor) -> tuple[int, list[str]]:
    """Sum over conv/linear of MACs x weight bits x input-activation bits (see the module docstring)."""
    from aimet_torch.quantization.base import QuantizerBase

    produced, layers, unknown, hooks, last = {}, [], [], [], [None]
    params = {id(q) for m in sim_model.modules() for q in getattr(m, "param_quantizers", {}).values() if q is not None}

    def qhook(q):
        def h(mod, inp, out):
            if torch.is_tensor(out) and id(q) not in params:
                produced[out.data_ptr()] = (_bits(q), out)  # the tensor is kept: no reuse of its address
                last[0] = _bits(q)
        return h

    def lhook(name):
        def h(mod, inp, out):
            iq = getattr(mod, "input_quantizers", [None])
            if len(iq) and iq[0] is not None:
                ab = _bits(iq[0])
            elif inp[0].data_ptr() in produced:
                ab = produced[inp[0].data_ptr()][0]
            else:  # reached through an unquantized functional op (torchvision's pooling): the last quantizer run
                unknown.append(name)
                ab = last[0] if last[0] is not None else 32
            pq = getattr(mod, "param_quantizers", {})
            wq = pq["weight"] if "weight" in pq else None  # noqa: SIM401  (ModuleDict has no .get)
            macs = out[0].numel() * mod.weight[0].numel()
            layers.append(macs * _bits(wq) * ab)
        return h

    for name, m in sim_model.named_modules():
        if isinstance(m, QuantizerBase):
            hooks.append(m.register_forward_hook(qhook(m)))
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(lhook(name)))
    try:
        sim_model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return int(sum(layers)), unknown


def set_candidate(sim, group, cand) -> None:
    """Put one AIMET quantizer group at a candidate (its activation and parameter quantizers' bitwidths)."""
    (abw, _), (pbw, _) = cand
    mods = dict(sim.model.named_modules())
    for name in group.input_quantizers:
        mod, idx = name.split("_input_quantizer_idx_")
        q = mods[mod].input_quantizers[int(idx)]
        if q is not None:
            q.bitwidth = abw
    for name in group.output_quantizers:
        for q in mods[name].output_quantizers:
            if q is not None:
                q.bitwidth = abw
    for name in group.parameter_quantizers:
        for q in mods[name].param_quantizers.values():
            if q is not None:
                q.bitwidth = pbw


def main():
    from edgequant.metrics import fidelity, sqnr_db

    folder, targets, out, save = runner_args("aimet", aimet_torch.__version__)
    try:
        model, cal, ev, ref, cal_ref = load(folder)
        batches = list(cal.split(BATCH))
        score_x, score_ref = cal[:32], cal_ref[:32]

        def forward_pass(m, _=None):
            with torch.no_grad():
                for b in batches:
                    m(b)

        def sqnr_on_calibration(m, _=None) -> float:
            with torch.no_grad():
                return sqnr_db(score_ref, torch.cat([m(b) for b in score_x.split(BATCH)]))

        def held_out(m):
            with torch.no_grad():
                return fidelity(ref, torch.cat([m(b) for b in ev.split(32)]))

        t0 = time.perf_counter()
        sim = QuantizationSimModel(model, dummy_input=cal[:1], quant_scheme=QuantScheme.post_training_tf_enhanced,
                                   default_param_bw=8, default_output_bw=16, config_file=None)
        sim.compute_encodings(forward_pass, None)
        high_bops, unknown = bit_ops(sim.model, cal)
        out["high_bops"], out["high_unknown_inputs"] = high_bops, unknown
        print(f"[aimet] all-high: {high_bops / 1e9:.2f} G bit-ops (inputs of unknown precision: {unknown})", flush=True)
        pareto = choose_mixed_precision(
            sim, cal[:1], [HIGH, LOW], eval_callback_for_phase1=CallbackFunc(sqnr_on_calibration),
            eval_callback_for_phase2=CallbackFunc(sqnr_on_calibration), allowed_accuracy_drop=None,
            results_dir=str(folder / "aimet_amp"), clean_start=True, forward_pass_callback=CallbackFunc(forward_pass),
            amp_search_algo=AMPSearchAlgo.Binary)
        search_s = time.perf_counter() - t0
        with open(folder / "aimet_amp" / ".cache" / "accuracy_list.pkl", "rb") as f:
            accuracy_list = pickle.load(f)  # phase 1: (group, candidate, score, bit-ops reduction), the order of phase 2
        out["search_seconds"] = search_s
        out["pareto"] = [(float(b), float(s), str(c)) for b, s, _, c in pareto]
        # the cumulative front's bit operations, counted here (no evaluation needed)
        groups = list(dict.fromkeys(g for g, *_ in accuracy_list))
        for g in groups:
            set_candidate(sim, g, HIGH)
        front = []
        for g, c, *_ in accuracy_list:
            set_candidate(sim, g, c)
            front.append(bit_ops(sim.model, cal)[0])
        out["front_bops"] = front
        save()
        for t in targets:
            row = {"target": t, "high_bops": high_bops, "load_average": os.getloadavg()[0]}
            try:
                ok = [i for i, b in enumerate(front) if b <= t * high_bops]
                if not ok:
                    raise RuntimeError(f"no point of AMP's front within {t} of the all-high bit-ops")
                i = ok[0]  # AMP's phase 2 takes scores to fall along its list: the first point within budget
                t1 = time.perf_counter()
                for g in groups:
                    set_candidate(sim, g, HIGH)
                for g, c, *_ in accuracy_list[:i + 1]:
                    set_candidate(sim, g, c)
                sim.compute_encodings(forward_pass, None)  # as AMP's phase 2 does at each point it scores
                score = sqnr_on_calibration(sim.model)
                row["seconds"] = search_s + time.perf_counter() - t1
                row["bops"], unknown = bit_ops(sim.model, cal)
                f = held_out(sim.model)
                row.update(sqnr_db=f.sqnr_db, top1=f.top1, search_score=score, groups_lowered=i + 1, groups=len(accuracy_list))
                row["note"] = (f"{i + 1} of {len(accuracy_list)} quantizer groups at W4A8 (first point of AMP's phase-2 "
                               f"list within the budget); its score (SQNR dB, 32 calibration crops) {score:.2f}; all-high "
                               f"counted {high_bops / 1e9:.2f} G; AMP's own binary search evaluated {len(pareto)} points"
                               + (f"; input precision of {unknown} taken from the last activation quantizer run before it" if unknown else ""))
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            out["rows"].append(row)
            print("[aimet]", row, flush=True)
            save()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        err = f"{type(e).__name__}: {e}"
        out["rows"] = out["rows"] or [{"target": t, "error": err} for t in targets]
        save()


if __name__ == "__main__":
    main()
