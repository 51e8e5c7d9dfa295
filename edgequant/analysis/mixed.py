"""Mixed precision: spend bits where they matter, under a bit-operation budget or an accuracy target.

Every quantizer has two candidates: its spec in a ``high`` config (say W8A16) and in a ``low`` one (say
W4A8). Both configs are calibrated once; switching a quantizer between them is then instant (its spec
through ``sim.set_spec``, its encoding from the calibrated config). The search has two phases, as AIMET's
AMP, with the sensitivities feeding a greedy solver:

1. **sensitivity**: each quantizer alone is lowered, and the drop of the score (output SQNR against the
   float model, or ``eval_fn``) and the bit operations it saves (:mod:`edgequant.sim.cost`) are measured;
2. **greedy front**: quantizers are lowered one after another, cheapest drop per bit-operation saved first,
   and the model is evaluated after each step: every step is a point of the accuracy / cost front.

The chosen point is the cheapest one within ``max_drop`` of the all-high score (or the best one within a
``budget`` fraction of its bit operations). Its plan is rebuilt into a fresh sim, calibrated and scored
again: the final check that it meets the target on its own.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from tqdm.auto import tqdm

from ..batches import model_input, to_device
from ..config.plan import QuantPlan
from .sensitivity import scorer


@dataclass
class FrontPoint:
    """One mix: its bit operations, score, and the quantizers at the low candidate."""
    bops: int
    score: float
    lowered: list[str]


@dataclass
class MixedPrecisionResult:
    high_score: float
    low_score: float
    high_bops: int
    low_bops: int
    front: list[FrontPoint] = field(default_factory=list)
    chosen: Optional[FrontPoint] = None
    plan: Optional[QuantPlan] = None
    sim: object = None
    verified_score: Optional[float] = None
    seconds: float = 0.0

    def to_markdown(self) -> str:
        lines = [f"all high: {self.high_score:.2f} at {self.high_bops / 1e9:.2f} G bit-ops; all low: {self.low_score:.2f} "
                 f"at {self.low_bops / 1e9:.2f} G bit-ops; {self.seconds:.0f} s", "",
                 "| G bit-ops | share of all-high | score | quantizers lowered |", "|---|---|---|---|"]
        for p in self.front:
            mark = " (chosen)" if p is self.chosen else ""
            lines.append(f"| {p.bops / 1e9:.2f} | {p.bops / self.high_bops:.2f} | {p.score:.2f}{mark} | {len(p.lowered)} |")
        if self.chosen is not None:
            lines.append(f"\nchosen: {len(self.chosen.lowered)} quantizers lowered, {self.chosen.bops / self.high_bops:.2f} of the "
                         f"bit operations; rebuilt from its plan and recalibrated: {self.verified_score:.2f}")
        return "\n".join(lines)


class _Switcher:
    """Moves quantizers of one sim between the high and the low candidate."""

    def __init__(self, sim, hi, lo):
        qh, ql = hi.quantizers(), lo.quantizers()
        self.sim = sim
        self.cand = {n: ((hi.plan[n].spec, qh[n].encoding()), (lo.plan[n].spec, ql[n].encoding()))
                     for n in qh if n in ql and hi.plan[n].spec != lo.plan[n].spec}

    def set(self, name: str, low: bool) -> None:
        spec, enc = self.cand[name][1 if low else 0]
        self.sim.set_spec(name, spec).set_encoding(enc)


def mixed_precision(model, calib_data, *, high="w8a16", low="w4a8", eval_data=None, eval_fn: Optional[Callable] = None,
                    max_drop: Optional[float] = None, budget: Optional[float] = None, num_eval_batches: int = 2,
                    progress: bool = True) -> MixedPrecisionResult:
    """Search per-quantizer precisions between two configs (see the module docstring).

    Args:
        model: the float model (not modified).
        calib_data: calibration batches.
        high, low: the two candidates (preset names or QuantConfigs with the same placement).
        eval_data: batches to score on (default: the first ``num_eval_batches`` calibration batches).
        eval_fn: ``eval_fn(sim) -> float`` (higher is better) instead of the output SQNR in dB.
        max_drop: choose the cheapest point whose score is at most this below the all-high score
            (default 1.0 when no ``budget`` is given).
        budget: instead, choose the best point within this fraction of the all-high bit operations.
    """
    from ..sim.quantsim import QuantSim

    t0 = time.perf_counter()
    batches = list(calib_data)
    example = model_input(batches[0])
    sims = {}
    for name, cfg in (("high", high), ("low", low)):
        sims[name] = QuantSim(model, example, cfg)
        sims[name].calibrate(batches, progress=progress)
    sim = sims["high"]
    base_plan = sim.plan  # plans are immutable: the switches below give the sim new ones
    scoring = [to_device(b, sim.device) for b in (list(eval_data) if eval_data is not None else batches[:num_eval_batches])]
    switch = _Switcher(sim, sims["high"], sims["low"])
    score = scorer(sim, scoring, eval_fn)
    res = MixedPrecisionResult(score(), scorer(sims["low"], scoring, eval_fn)(), sim.cost().bops, sims["low"].cost().bops)
    ratios = {}
    for name in tqdm(list(switch.cand), desc="mixed precision: sensitivity", unit="quantizer", disable=not progress):
        switch.set(name, low=True)
        drop, saved = res.high_score - score(), res.high_bops - sim.cost().bops
        switch.set(name, low=False)
        ratios[name] = max(drop, 0.0) / max(saved, 1)
    lowered: list[str] = []
    res.front.append(FrontPoint(res.high_bops, res.high_score, []))
    for name in tqdm(sorted(ratios, key=ratios.get), desc="mixed precision: front", unit="step", disable=not progress):
        switch.set(name, low=True)
        lowered.append(name)
        res.front.append(FrontPoint(sim.cost().bops, score(), list(lowered)))
    res.front = _pareto(res.front)
    res.chosen = _choose(res, max_drop, budget)
    if res.chosen is not None:
        _verify(res, model, example, batches, base_plan, sim.config, switch, scoring, eval_fn, progress)
    res.seconds = time.perf_counter() - t0
    return res


def _pareto(points: list[FrontPoint]) -> list[FrontPoint]:
    """The points no other point beats on both cost and score, cheapest first."""
    front, best = [], -float("inf")
    for p in sorted(points, key=lambda p: (p.bops, -p.score)):
        if p.score > best:
            front.append(p)
            best = p.score
    return front


def _choose(res: MixedPrecisionResult, max_drop, budget) -> Optional[FrontPoint]:
    if budget is not None:
        within = [p for p in res.front if p.bops <= budget * res.high_bops]
        return max(within, key=lambda p: p.score) if within else None
    drop = 1.0 if max_drop is None else max_drop
    ok = [p for p in res.front if p.score >= res.high_score - drop]
    return min(ok, key=lambda p: p.bops) if ok else None


def _verify(res, model, example, batches, base_plan, config, switch, scoring, eval_fn, progress) -> None:
    """Rebuild the chosen plan into a fresh sim, calibrate it, score it."""
    from ..sim.quantsim import QuantSim

    plan = base_plan.with_specs({n: switch.cand[n][1][0] for n in res.chosen.lowered})
    sim = QuantSim(model, example, config, plan=plan)
    sim.calibrate(batches, progress=progress)
    res.plan, res.sim = plan, sim
    res.verified_score = scorer(sim, scoring, eval_fn)()
