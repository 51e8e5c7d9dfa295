"""Mixed precision: spend bits where they matter, under a bit-operation budget or an accuracy target.

Every quantizer has two candidates: its spec in a ``high`` config (say W8A16) and in a ``low`` one (say
W4A8). Both configs are calibrated once; switching a quantizer between them is then instant (its spec
through ``sim.set_spec``, its encoding from the calibrated config). Quantizers whose grids must agree on
the target move together: the inputs of an add or a concat (an integer add or concat kernel takes one
integer width) form one **group**. The search has two phases, as AIMET's AMP, then goes beyond it:

1. **sensitivity**: each group alone is lowered, and the drop of the score (output SQNR against the
   float model, or ``eval_fn``) and the bit operations it saves (:mod:`edgequant.sim.cost`) are measured;
2. **greedy front**: groups are lowered one after another, cheapest drop per bit-operation saved first,
   and the model is evaluated after each step: every step is a point of the accuracy / cost front;
3. **exact knapsack**: for a ladder of budgets, the set of groups that saves enough bit operations at the
   least predicted loss is solved exactly (dynamic programming over the savings). With SQNR scores the
   prediction adds the groups' *noise powers* (``10^(-SQNR/10)`` above the all-high noise), which add up
   where dB drops do not; with ``eval_fn`` it adds the drops. Each solution is evaluated for real and
   joins the front.

The chosen point is the cheapest one within ``max_drop`` of the all-high score (or the best one within a
``budget`` fraction of its bit operations). Its plan is rebuilt into a fresh sim, calibrated and scored
again: the final check that it meets the target on its own.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from ..batches import model_input, to_device
from ..config.plan import QuantPlan
from ..solvers import knapsack
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
    _rebuild: Optional[Callable] = field(default=None, repr=False)

    def build(self, point: FrontPoint):
        """A fresh, calibrated sim of any front point (its plan; lowered weights as the search had them)."""
        if self._rebuild is None:
            raise RuntimeError("this result has no search context to rebuild from")
        return self._rebuild(point)

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
        self.low: set[str] = set()  # the quantizers now at the low candidate
        # weights: each candidate's tensor (the low one differs when AdaRound rounded it), and the bias of
        # its layer (each candidate's own bias correction)
        self.weights = {n: (sim.model.get_parameter(n).detach().clone(), lo.model.get_parameter(n).detach().clone())
                        for n in self.cand if qh[n].is_weight}
        self.biases = {}
        for n in self.weights:
            pair = [_layer_bias(s.model, n) for s in (hi, lo)]
            if all(b is not None for b in pair):
                self.biases[n] = tuple(b.detach().clone() for b in pair)

    def set(self, name: str, low: bool) -> None:
        if (name in self.low) == low:
            return
        spec, enc = self.cand[name][1 if low else 0]
        if name in self.weights:
            with torch.no_grad():
                self.sim.model.get_parameter(name).copy_(self.weights[name][1 if low else 0])
                if name in self.biases:
                    _layer_bias(self.sim.model, name).copy_(self.biases[name][1 if low else 0])
        self.sim.set_spec(name, spec).set_encoding(enc)
        (self.low.add if low else self.low.discard)(name)

    def set_all(self, names, low: bool) -> None:
        for n in names:
            self.set(n, low)

    def only(self, names) -> None:
        """Exactly ``names`` at the low candidate, every other quantizer at the high one."""
        low = set(names)
        for n in self.cand:
            self.set(n, n in low)


def _layer_bias(model, weight_name: str) -> Optional[torch.nn.Parameter]:
    """The bias of the layer that owns ``<layer>.weight`` (None for other tensors or a layer without one)."""
    prefix, _, leaf = weight_name.rpartition(".")
    if leaf != "weight":
        return None
    b = getattr(model.get_submodule(prefix), "bias", None)
    return b if isinstance(b, torch.nn.Parameter) else None


def shared_grid_groups(sim, names: list[str]) -> list[list[str]]:
    """``names`` in groups that must share a bit-width: the activation quantizers feeding one add or concat
    (through grid-keeping ops) are one group; every other quantizer is a group of its own."""
    from ..graph import lowering, patterns

    parent = {n: n for n in names}

    def root(n):
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    if sim.capture_mode == "graph":
        modules = dict(sim.model.named_modules())
        for node in sim.model.graph.nodes:
            if not (patterns.is_add(node) or patterns.is_cat(node)):
                continue
            ins = node.args[0] if patterns.is_cat(node) else node.args[:2]
            found = [q.tensor_name for a in ins if (q := lowering.source_quantizer(a, modules)) is not None
                     and q.tensor_name in parent]
            for a, b in zip(found, found[1:]):
                parent[root(a)] = root(b)
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(root(n), []).append(n)
    return list(groups.values())


def _greedy_front(sens, switch, sim, score, progress) -> list[FrontPoint]:
    """Lower the groups cheapest drop per bit-operation saved first, evaluating after each (AIMET's phase 2)."""
    order = sorted(sens, key=lambda t: max(t[1], 0.0) / max(t[2], 1))
    lowered, points = [], []
    for g, _, _ in tqdm(order, desc="mixed precision: greedy front", unit="step", disable=not progress):
        switch.set_all(g, low=True)
        lowered += g
        points.append(FrontPoint(sim.cost().bops, score(), list(lowered)))
    return points


def _knapsack_front(sens, res, switch, sim, score, additive_noise: bool, points: int, progress) -> list[FrontPoint]:
    """Exact knapsack solutions for ``points`` budgets between all-low and all-high, each evaluated."""
    if points <= 0 or not sens:
        return []
    if additive_noise:  # SQNR in dB: noise powers add up
        base = 10 ** (-res.high_score / 10)
        costs = [max(10 ** (-(res.high_score - d) / 10) - base, 0.0) for _, d, _ in sens]
    else:
        costs = [max(d, 0.0) for _, d, _ in sens]
    gains = [max(s, 0) for _, _, s in sens]
    span = res.high_bops - res.low_bops
    out, seen = [], set()
    for k in tqdm(range(1, points + 1), desc="mixed precision: knapsack", unit="budget", disable=not progress):
        pick = knapsack(costs, gains, span * k / (points + 1))
        if pick is None or tuple(pick) in seen:
            continue
        seen.add(tuple(pick))
        lowered = [n for i in pick for n in sens[i][0]]
        switch.only(lowered)
        out.append(FrontPoint(sim.cost().bops, score(), lowered))
    return out


def mixed_precision(model, calib_data, *, high="w8a16", low="w4a8", eval_data=None, eval_fn: Optional[Callable] = None,
                    max_drop: Optional[float] = None, budget: Optional[float] = None, num_eval_batches: int = 2,
                    knapsack_points: int = 12, low_adaround: int = 0, bias_correction: bool = True,
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
        knapsack_points: budgets solved exactly and evaluated (0: the greedy front only).
        low_adaround: AdaRound iterations per layer for the low candidate's weights (0: nearest rounding),
            reconstructing each layer from float inputs so that roundings combine in any mix, on the calibration
            batches the search does not score on; a lowered weight then takes its AdaRound rounding, in the search
            and in the rebuilt sim.
        bias_correction: empirical bias correction (:func:`edgequant.ptq.correct_bias`) of both candidates
            before the search (a layer switched to a candidate takes that candidate's corrected bias) and of
            the rebuilt sim. Quantized weights shift the mean output of every layer; on MobileNetV2 the shift
            alone costs W8A16 about 8 dB of logit SQNR, so a search without it ranks every candidate on a
            score the deployed model would not have.
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
    # scorers take the float reference now, before AdaRound writes rounded weights into the low sim
    score, score_low = scorer(sim, scoring, eval_fn), scorer(sims["low"], scoring, eval_fn)
    if low_adaround:
        from ..ptq.adaround import adaround
        # from float inputs: each layer's rounding then stands on its own. Reconstructing from the quantized
        # model's inputs (AdaRound's default) makes each layer's rounding compensate the 4-bit layers before
        # it, and a mix that keeps some of those at 8 bits breaks the compensation: on MobileNetV2 every mixed
        # point then scored below the all-low one in the search (all-low 17.4 dB on its own calibration crops,
        # 4.5 dB on other photos)
        # and on batches the search does not score on (when there are others): AdaRound fits the batches it
        # reconstructs, and a search scored on them prefers the all-low point to every mix
        fit = batches[num_eval_batches:] if eval_data is None and len(batches) > num_eval_batches else batches
        adaround(sims["low"], fit, iterations=low_adaround, asymmetric=False, progress=progress)
    if bias_correction:
        from ..ptq.bias_correction import correct_bias
        for s in sims.values():
            correct_bias(s, batches, measure=False, progress=progress)
    switch = _Switcher(sim, sims["high"], sims["low"])
    res = MixedPrecisionResult(score(), score_low(), sim.cost().bops, sims["low"].cost().bops)
    groups = shared_grid_groups(sim, list(switch.cand))
    sens = []
    for g in tqdm(groups, desc="mixed precision: sensitivity", unit="group", disable=not progress):
        switch.set_all(g, low=True)
        sens.append((g, res.high_score - score(), res.high_bops - sim.cost().bops))
        switch.set_all(g, low=False)
    res.front.append(FrontPoint(res.high_bops, res.high_score, []))
    res.front += _greedy_front(sens, switch, sim, score, progress)
    res.front += _knapsack_front(sens, res, switch, sim, score, eval_fn is None, knapsack_points, progress)
    res.front = _pareto(res.front)
    res.chosen = _choose(res, max_drop, budget)
    res._rebuild = lambda p: _rebuild(p, model, example, batches, base_plan, sim.config, switch, scoring, eval_fn,
                                      bias_correction, progress)
    if res.chosen is not None:
        res.sim, res.verified_score = res._rebuild(res.chosen)
        res.plan = res.sim.plan
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


def _rebuild(point, model, example, batches, base_plan, config, switch, scoring, eval_fn, bias_correction, progress):
    """``(sim, score)``: the point's plan in a fresh sim (lowered weights as in the search), calibrated, scored."""
    from ..sim.quantsim import QuantSim

    plan = base_plan.with_specs({n: switch.cand[n][1][0] for n in point.lowered})
    sim = QuantSim(model, example, config, plan=plan)
    score = scorer(sim, scoring, eval_fn)  # the float reference, before the rounded weights go in
    qs = sim.quantizers()
    with torch.no_grad():
        for n in point.lowered:
            if n in switch.weights:  # the low candidate's (AdaRound) rounding and encoding, kept by calibration
                sim.model.get_parameter(n).copy_(switch.weights[n][1])
                qs[n].set_encoding(switch.cand[n][1][1])
                qs[n].freeze()
    sim.calibrate(batches, progress=progress)
    if bias_correction:
        from ..ptq.bias_correction import correct_bias
        correct_bias(sim, batches, measure=False, progress=progress)
    return sim, score()
