"""Where the quantization error comes from: per-quantizer sensitivity, ranked, with a suggested fix.

One sim is calibrated once; each quantizer is then toggled in it:

* ``only``: the output SQNR against the float model with *only* this quantizer enabled (the error it
  causes on its own);
* ``all_but``: with every quantizer enabled *but* this one (how much the whole model gains without it).

Beside them: the share of the calibration values the quantizer clipped (histogram observers), and for
weights the spread of the per-channel ranges (``max / median`` of the channels' absolute maxima: what
per-channel grids or cross-layer equalization fix). The ranking is by ``only`` (worst first).

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
>>> data = [torch.randn(32, 8) for _ in range(2)]
>>> report = analyze(net, data, "w4a8", progress=False)
>>> len(report.quantizers) == 5 and report.quantizers[0].only_sqnr_db <= report.quantizers[-1].only_sqnr_db
True
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from ..batches import evaluating, model_input, run_batch, to_device
from ..core.granularity import PerTensor
from ..metrics import sqnr_db

#: a per-tensor weight whose channel ranges differ by more than this (its median channel then uses under a
#: quarter of the grid) wants per-channel grids or CLE
CHANNEL_SPREAD = 4.0
#: an activation quantizer clipping more than this share of its values wants another range method
CLIPPING = 0.01


@dataclass
class QuantizerSensitivity:
    name: str
    role: str
    bits: int
    only_sqnr_db: float
    all_but_sqnr_db: float
    clipped: float
    channel_spread: Optional[float]
    suggestion: str


@dataclass
class AnalysisReport:
    """``quantizers`` worst first; ``all_sqnr_db``: every quantizer enabled; ``score``: SQNR (dB) of the
    outputs against the float model, or the user's ``eval_fn``."""
    score: str
    all_sqnr_db: float
    quantizers: list[QuantizerSensitivity] = field(default_factory=list)
    seconds: float = 0.0

    def worst(self, k: int = 10) -> list[QuantizerSensitivity]:
        return self.quantizers[:k]

    def to_dict(self) -> dict:
        return {"score": self.score, "all_sqnr_db": self.all_sqnr_db, "seconds": self.seconds,
                "quantizers": [asdict(q) for q in self.quantizers]}

    def to_markdown(self, k: int = 20) -> str:
        lines = [f"all quantizers enabled: {self.all_sqnr_db:.2f} ({self.score}); {len(self.quantizers)} quantizers "
                 f"analysed in {self.seconds:.1f} s", "",
                 "| rank | quantizer | role | bits | only it enabled | all but it | clipped | channel spread | suggestion |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for i, q in enumerate(self.quantizers[:k], 1):
            spread = f"{q.channel_spread:.1f}x" if q.channel_spread is not None else ""
            lines.append(f"| {i} | {q.name} | {q.role} | {q.bits} | {q.only_sqnr_db:.2f} | {q.all_but_sqnr_db:.2f} | "
                         f"{q.clipped:.2%} | {spread} | {q.suggestion} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown(10)


def _channel_spread(q, weight) -> Optional[float]:
    if weight is None or weight.ndim < 2:
        return None
    r = weight.detach().abs().reshape(weight.shape[0], -1).amax(1)
    med = float(r.median())
    return float(r.max()) / med if med > 0 else math.inf


def _suggest(q, spread, clipped, only_db, all_db) -> str:
    """A fix for what the numbers show; a quantizer that alone costs nearly as much as all of them
    together (within 3 dB) is a main source of error."""
    s = q.spec
    main = only_db < all_db + 3
    if q.is_weight and spread is not None and spread > CHANNEL_SPREAD and isinstance(s.granularity, PerTensor):
        return f"channel ranges differ {spread:.0f}x: per-channel weights, or cross-layer equalization"
    if not q.is_weight and clipped > CLIPPING:
        return f"clips {clipped:.1%} of its values: another range method (mse / minmax) or more bits"
    if main and q.role == "output":
        return "the model output: keep it at accumulator precision (sim.disable(sim.output_quantizers())) or a loss-aware range"
    if main:
        return f"a main source of error: {'8' if q.is_weight and s.bits < 8 else '16'}-bit {'weights' if q.is_weight else 'activations'}"
    return ""


def scorer(sim, batches, eval_fn: Optional[Callable] = None) -> Callable[[], float]:
    """``score()`` of ``sim`` as it is now: ``eval_fn(sim)``, or the SQNR (dB) of its outputs on ``batches``
    against the float model's (taken once, here, with every quantizer disabled). Runs in eval mode."""
    def outputs():
        with evaluating(sim), torch.no_grad():
            return torch.cat([run_batch(sim, b, sim._n_positional).float().flatten(1) for b in batches])

    with sim.quantization_disabled():
        ref = outputs()

    def score() -> float:
        return float(eval_fn(sim)) if eval_fn is not None else sqnr_db(ref, outputs())
    return score


def analyze(model_or_sim, calib_data, config="w8a8", *, eval_data=None, eval_fn: Optional[Callable] = None,
            num_eval_batches: int = 2, progress: bool = True) -> AnalysisReport:
    """Per-quantizer sensitivity of a quantized model (see the module docstring).

    Args:
        model_or_sim: a float model (a sim is built with ``config`` and calibrated on ``calib_data``) or a
            calibrated :class:`~edgequant.QuantSim` (its enabled quantizers are analysed; it is left as it was).
        calib_data: calibration batches (used only to build and calibrate a sim from a model).
        eval_data: batches to score on (default: the first ``num_eval_batches`` calibration batches).
        eval_fn: ``eval_fn(sim) -> float`` (higher is better) instead of the output SQNR.
    """
    from ..sim.quantsim import QuantSim

    t0 = time.perf_counter()
    if isinstance(model_or_sim, QuantSim):
        sim = model_or_sim
    else:
        batches = list(calib_data)
        sim = QuantSim(model_or_sim, model_input(batches[0]), config)
        sim.calibrate(batches, progress=progress)
    scoring = [to_device(b, sim.device) for b in (list(eval_data) if eval_data is not None else list(calib_data)[:num_eval_batches])]
    names = list(sim.quantizers())
    with evaluating(sim):
        score = scorer(sim, scoring, eval_fn)
        report = AnalysisReport("eval_fn" if eval_fn is not None else "output SQNR dB against the float model", score())
        qs = sim.quantizers()
        for name in tqdm(names, desc="sensitivity", unit="quantizer", disable=not progress):
            off = sim.disable(name)
            all_but = score()
            sim.enable(off)
            others = sim.disable([n for n in names if n != name])
            only = score()
            sim.enable(others)
            q = qs[name]
            weight = sim.model.get_parameter(name) if q.is_weight else None
            spread = _channel_spread(q, weight)
            report.quantizers.append(QuantizerSensitivity(name, q.role, q.spec.bits, only, all_but, q.clipped, spread,
                                                          _suggest(q, spread, q.clipped, only, report.all_sqnr_db)))
    report.quantizers.sort(key=lambda s: s.only_sqnr_db)
    report.seconds = time.perf_counter() - t0
    return report

