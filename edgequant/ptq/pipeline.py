"""``edgequant.quantize``: the one-call post-training quantization recipe.

Stages, in the order of the white paper (Nagel et al., 2021) and AIMET's AutoQuant:

==================  =========================================================================
``bn_fold``         fold batch norms into the layers before them (float model)
``cle``             cross-layer equalization (float model, exact)
``hba``             high-bias absorption (float model, approximate; needs ``bn_fold``)
``calibrate``       activation and weight ranges from the data (always; BN-based without data)
``adaround``        learned rounding of the weights (default in "auto" when weights have <= 4 bits)
``bias_correction`` empirical bias correction (default in "auto" for 5 bits and more), or the
                    analytical one when there is no data
``loss_aware``      cross-entropy range for the output quantizer (classifiers: 2-D outputs)
==================  =========================================================================

``ptq="auto"`` runs them in that order and keeps a stage only if it scores better than the best so
far (the score is ``eval_fn(sim)`` when given, else logit SQNR against the float model on held-out
calibration batches); with ``eval_fn`` and ``max_drop`` it stops at the first stage whose drop from
the float model's score is within ``max_drop``. A list of stage names runs exactly those, in the
order above, and keeps them all. ``"none"`` only calibrates.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..analysis.fidelity import fidelity, sqnr_db
from ..config.spec import QuantConfig
from ..sim.quantsim import QuantSim, _to_device
from .adaround import adaround
from .bias_correction import correct_bias, correct_bias_analytical
from .bn_fold import fold_batch_norms
from .cle import absorb_high_biases, cross_layer_equalization
from .data_free import set_bn_ranges
from .loss_aware import loss_aware_output_range

STAGES = ("bn_fold", "cle", "hba", "calibrate", "adaround", "bias_correction", "loss_aware")
_MODEL_STAGES = ("bn_fold", "cle", "hba")


@dataclass
class StageResult:
    name: str
    kept: bool
    score: Optional[float]
    sqnr_db: Optional[float]
    top1: Optional[float]
    seconds: float
    detail: str = ""


@dataclass
class QuantizeReport:
    recipe: str
    score_name: str
    float_score: Optional[float]
    stages: list[StageResult] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def to_markdown(self) -> str:
        lines = [f"recipe `{self.recipe}`; score = {self.score_name}"
                 + (f" (float model: {self.float_score:.4g})" if self.float_score is not None else ""), "",
                 "| stage | kept | score | logit SQNR dB | top-1 agreement | seconds | detail |", "|---|---|---|---|---|---|---|"]
        f = lambda v, p=".4g": "" if v is None else format(v, p)  # noqa: E731
        for s in self.stages:
            lines.append(f"| {s.name} | {'yes' if s.kept else 'no'} | {f(s.score)} | {f(s.sqnr_db, '.2f')} | "
                         f"{f(s.top1, '.3f')} | {s.seconds:.1f} | {s.detail} |")
        lines.append(f"\ntotal {self.seconds:.1f} s")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


@dataclass
class QuantizeResult:
    """What :func:`quantize` returns: the calibrated ``sim``, its ``encodings`` ``(activations,
    params)`` and the ``report`` of every stage."""
    sim: QuantSim
    encodings: tuple
    report: QuantizeReport
    model: nn.Module  # the float model the sim was built from (after folding/equalization)


def _resolve(ptq, has_data: bool) -> tuple[list[str], bool]:
    if ptq == "auto":
        return list(STAGES), True
    if ptq == "none":
        return ["calibrate"], False
    if isinstance(ptq, str):
        ptq = [ptq]
    unknown = [s for s in ptq if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown PTQ stage(s) {unknown}; choose from {list(STAGES)}, or ptq='auto' / 'none'")
    stages = [s for s in STAGES if s in ptq or s == "calibrate"]
    if not has_data and ("adaround" in stages or "loss_aware" in stages):
        raise ValueError("adaround and loss_aware need calibration data")
    return stages, False


def _reiterable(data):
    if data is None or hasattr(data, "__len__") or iter(data) is not data:
        return data
    return list(data)  # a generator: keep its batches


def quantize(model: nn.Module, calib_data=None, recipe="w8a8", ptq="auto", eval_fn: Optional[Callable] = None,
             max_drop: Optional[float] = None, *, example_inputs=None, num_batches: Optional[int] = None,
             holdout_batches: int = 2, input_ranges: Optional[dict] = None, input_stats: Optional[dict] = None,
             adaround_iterations: int = 800, progress: bool = True) -> QuantizeResult:
    """Quantize ``model`` in one call; the float model is never modified.

    Args:
        model: the float model (put in eval mode for the run).
        calib_data: calibration batches (tensors, tuples ``(inputs, labels)``, dicts, a DataLoader),
            or ``None`` for data-free quantization (BN-based ranges, analytical bias correction;
            give ``input_ranges`` and ``example_inputs``).
        recipe: a preset name (``"w8a8"``, ``"w4a8"``, ``"w8a8_per_tensor"``, ...) or a QuantConfig.
        ptq: ``"auto"``, ``"none"`` or a list of stage names (see the module docstring).
        eval_fn: ``eval_fn(model_or_sim) -> float``, higher is better (e.g. accuracy on a labelled
            set); called on the float model once and on the sim after every stage.
        max_drop: with ``eval_fn``: stop at the first stage whose score is within this of the float score.
        example_inputs: inputs for graph capture (default: the first calibration batch).
        num_batches: calibration batches to use (default: all).
        holdout_batches: without ``eval_fn``, the last this-many batches score each stage (logit
            SQNR against the float model) and are not used to calibrate; 0 scores on calibration data.
        input_ranges, input_stats: for data-free quantization (see :func:`~edgequant.ptq.set_bn_ranges`).
        adaround_iterations: Adam steps per layer for AdaRound.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    >>> data = [torch.randn(8, 3, 12, 12) for _ in range(4)]
    >>> result = quantize(net, data, recipe="w8a8_per_tensor", ptq=["bn_fold", "cle"], progress=False)
    >>> [s.name for s in result.report.stages]
    ['calibrate (no PTQ)', 'bn_fold', 'cle']
    >>> result.sim(torch.randn(1, 3, 12, 12)).shape
    torch.Size([1, 4, 8, 8])
    """
    t_start = time.perf_counter()
    config = QuantConfig.coerce(recipe)
    recipe_name = recipe if isinstance(recipe, str) else "custom"
    data = _reiterable(calib_data)
    has_data = data is not None
    stages, auto = _resolve(ptq, has_data)
    if has_data:
        batches = list(data) if num_batches is None else [b for _, b in zip(range(num_batches), data)]
        if not batches:
            raise ValueError("calib_data yielded no batches")
        hold = [] if eval_fn is not None or holdout_batches <= 0 or len(batches) <= holdout_batches else batches[-holdout_batches:]
        calib = batches[: len(batches) - len(hold)]
        score_batches = hold or calib[:2]
        if example_inputs is None:
            b0 = batches[0]
            example_inputs = b0[0] if isinstance(b0, (tuple, list)) else b0
    else:
        calib, score_batches = None, []
        if example_inputs is None:
            raise ValueError("data-free quantization needs example_inputs (and input_ranges for the model inputs)")
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def first(b):
        """The model input of a batch: a tensor, a dict of keyword inputs, or the first item of a tuple."""
        return _to_device(b[0] if isinstance(b, (tuple, list)) else b, device)

    def call(m, b):
        x = first(b)
        return m(**x) if isinstance(x, dict) else m(x)

    with torch.no_grad():
        ref = [call(model, b) for b in score_batches]

    def measure(sim) -> tuple[Optional[float], Optional[float], Optional[float]]:
        fid = None
        if ref:
            with torch.no_grad():
                out = torch.cat([call(sim, b).float() for b in score_batches])
            r = torch.cat([t.float() for t in ref])
            fid = fidelity(r, out) if r.ndim == 2 else None
            sq = fid.sqnr_db if fid is not None else sqnr_db(r, out)
        else:
            sq = None
        if eval_fn is not None:
            score = float(eval_fn(sim))
        else:
            score = sq
        return score, sq, (fid.top1 if fid is not None else None)

    float_score = float(eval_fn(model)) if eval_fn is not None else None
    report = QuantizeReport(recipe_name, "eval_fn" if eval_fn is not None else
                            ("logit SQNR dB on held-out calibration batches" if hold else "logit SQNR dB on calibration batches")
                            if has_data else "none (no data, no eval_fn)", float_score)

    def done(score) -> bool:
        return eval_fn is not None and max_drop is not None and score is not None and float_score - score <= max_drop

    def build(m):
        sim = QuantSim(m, example_inputs, config)
        if has_data:
            sim.calibrate(calib, progress=False)
        else:
            set_bn_ranges(sim, input_ranges=input_ranges, input_stats=input_stats)
        return sim

    current = copy.deepcopy(model)
    best_sim, best_score = None, None
    w_bits = config.weight.bits if config.weight is not None else 32
    try:
        # --- stages on the float model: each is scored through a freshly calibrated sim
        for name in [s for s in stages if s in _MODEL_STAGES]:
            t0 = time.perf_counter()
            if best_sim is None:  # baseline: calibration only
                best_sim = build(current)
                best_score, sq, top1 = measure(best_sim)
                report.stages.append(StageResult("calibrate (no PTQ)", True, best_score, sq, top1, time.perf_counter() - t0))
                t0 = time.perf_counter()
            if done(best_score):
                break
            if name == "bn_fold":
                cand, r = fold_batch_norms(current)
                detail = f"folded {len(r.folded)}, left {len(r.skipped)}"
            elif name == "cle":
                cand, r = cross_layer_equalization(current, absorb_high_bias=False, fold="bn_fold" in stages)
                detail = f"{len(r.pairs)} pairs, {len(r.replaced_activations)} ReLU6->ChannelClamp"
            else:
                cand, r = absorb_high_biases(current, first(score_batches[0]) if score_batches else None)
                detail = f"absorbed in {len(r.absorbed)} layers" + (
                    f", float SQNR {r.sqnr_db_absorption:.1f} dB" if r.sqnr_db_absorption is not None else "")
            sim = build(cand)
            score, sq, top1 = measure(sim)
            keep = (not auto) or best_score is None or score is None or score > best_score
            report.stages.append(StageResult(name, keep, score, sq, top1, time.perf_counter() - t0, detail))
            if keep:
                current, best_sim, best_score = cand, sim, score
        if best_sim is None:
            t0 = time.perf_counter()
            best_sim = build(current)
            best_score, sq, top1 = measure(best_sim)
            report.stages.append(StageResult("calibrate", True, best_score, sq, top1, time.perf_counter() - t0))
        # --- stages on the sim
        for name in [s for s in stages if s not in _MODEL_STAGES and s != "calibrate"]:
            if done(best_score):
                break
            if auto and name == "adaround" and w_bits > 4:
                continue
            if auto and name == "bias_correction" and w_bits <= 4:
                continue
            if auto and name == "loss_aware":
                if not has_data or not ref or ref[0].ndim != 2:
                    continue
            if name in ("adaround", "loss_aware") and not has_data:
                continue
            t0 = time.perf_counter()
            sim = copy.deepcopy(best_sim)
            if name == "adaround":
                r = adaround(sim, calib, iterations=adaround_iterations, progress=progress)
                detail = f"{len(r.layers)} layers x {adaround_iterations} iterations"
            elif name == "bias_correction":
                if has_data:
                    r = correct_bias(sim, calib, measure=False, progress=progress)
                    detail = f"empirical, {len(r.layers)} layers"
                else:
                    r = correct_bias_analytical(sim, input_stats=input_stats)
                    detail = f"analytical, {len(r.layers)} layers, skipped {len(r.skipped)}"
            else:
                r = loss_aware_output_range(sim, calib)
                detail = f"cross-entropy {r.loss_before:.4f} -> {r.loss_after:.4f}"
            score, sq, top1 = measure(sim)
            keep = (not auto) or best_score is None or score is None or score > best_score
            report.stages.append(StageResult(name, keep, score, sq, top1, time.perf_counter() - t0, detail))
            if keep:
                best_sim, best_score = sim, score
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - t_start
    return QuantizeResult(best_sim, best_sim.encodings(), report, current)

