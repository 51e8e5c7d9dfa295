r"""Sum-preserving weight rounding: each filter keeps its response to a flat input (its DC gain).

A convolution filter's response to a constant region is the sum of its taps, ``sum_k w_k``. Nearest
rounding gets each tap within half a step but misses that sum by the sum of the taps' rounding errors
(about ``0.29 * sqrt(K)`` steps for ``K`` taps: 0.87 steps for a 3x3 filter). Empirical bias correction
cancels the resulting mean shift only for inputs whose mean matches the calibration data's; on a flat
region of another level (a sky, a black background, a binary image) the shift comes back, and the
depthwise filters of mobile networks pass it on undamped.

:func:`preserve_filter_sums` rounds the taps of every ``(output, input)`` channel pair of a convolution
with a kernel of more than one tap so that their integers sum as close as the grid allows to the float
sum (:func:`edgequant.core.quantize_sum_preserving`): the taps nearest a tie flip to their other
neighbour, each staying within one step. No training; data only to find the first layers in leaf mode.

**Which layers** (``layers="input"``, the default): the convolutions that read a model input. There the
flat regions are exactly flat (saturated skies, black backgrounds, binary images), and the trade-off is
clearest: keeping the sums costs each filter a little accuracy on textures (a flipped tap is off by more
than half a step). Measured on real MobileNetV2 (W8A8 per-channel, after ``bn_fold + act_eq``, then
bias correction; one-off scripts on the crops of ``benchmarks/bench_splits.py``, SQNR dB / KL against FP32 on
the held-out photo crops):

=====================================  ==================  ==================
layers                                 partition 0, 128    partition 1, 256
=====================================  ==================  ==================
none (nearest rounding)                18.12 / 0.0482      15.77 / 0.0681
the stem (``layers="input"``)          19.32 / 0.0328      15.79 / 0.0621
every 3x3 convolution (``"all"``)      19.64 / 0.0358      15.44 / 0.0669
=====================================  ==================  ==================

On partition 0 the gain is the binary ``horse`` photo's (12.6 -> 15.2 dB with the stem alone); with every
3x3 layer the texture photo ``brick`` lost 1.1-2.0 dB on each partition that evaluates it. The ten
columns of ``benchmarks/results/splits.md`` measure the default.

The rounded weights are written into the sim's layer (exactly on the grid) and its weight quantizer
is frozen, as AdaRound does; layers whose weight quantizer is already frozen (AdaRound's) are left
alone.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

import torch
from torch import nn

from ..batches import evaluating
from ..core.granularity import expand_param
from ..core import dequantize, quantize, quantize_sum_preserving
from ..nn.modules import QuantizedModuleMixin
from ..nn.quantizer import Quantizer


@dataclass
class DCRoundReport:
    """``layers``: ``{name: (mean |DC error| in steps with nearest rounding, after)}`` over the layer's
    filters; ``changed``: fraction of the layer's weights whose integer moved; ``skipped``: ``{name: reason}``."""
    layers: dict[str, tuple[float, float]] = field(default_factory=dict)
    changed: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def __str__(self) -> str:
        s = f"filter sums preserved in {len(self.layers)} layer(s)"
        if self.layers:
            before = sum(v[0] for v in self.layers.values()) / len(self.layers)
            after = sum(v[1] for v in self.layers.values()) / len(self.layers)
            moved = sum(self.changed.values()) / len(self.changed)
            s += f"; mean |filter sum error| {before:.3f} -> {after:.3f} steps, {moved:.1%} of weights moved"
        if self.skipped:
            s += f"; skipped {len(self.skipped)}"
        return s


def _candidates(sim) -> dict[str, nn.Module]:
    return {n: m for n, m in sim.model.named_modules()
            if isinstance(m, QuantizedModuleMixin) and isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
            and m.weight[0, 0].numel() > 1}


@torch.no_grad()
def input_readers(sim, data: Optional[Iterable] = None) -> set[str]:
    """Names of the modules whose input is a model input (directly or through its input quantizer): from the
    captured graph, or in leaf mode by running the first batch of ``data``."""
    graph = getattr(sim.model, "graph", None)
    if graph is not None:
        feeds = {n for n in graph.nodes if n.op == "placeholder"}
        feeds |= {n for n in graph.nodes if n.op == "call_module" and n.args and n.args[0] in feeds
                  and isinstance(sim.model.get_submodule(n.target), Quantizer)}
        return {n.target for n in graph.nodes if n.op == "call_module" and n.args and n.args[0] in feeds}
    if data is None:
        raise ValueError("in leaf mode the first layers are found by running a batch: pass data=, or layers=")
    seen, found, hooks = set(), set(), []
    hooks.append(sim.model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(id(a) for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)),
        with_kwargs=True))
    for q in sim.quantizers().values():
        if q.role == "input":
            hooks.append(q.register_forward_hook(lambda m, a, out: seen.add(id(out))))
    for name, m in sim.model.named_modules():
        if isinstance(m, QuantizedModuleMixin):
            hooks.append(m.register_forward_pre_hook(
                lambda m, args, name=name: found.add(name) if args and id(args[0]) in seen else None))
    try:
        with evaluating(sim):
            sim.run_batch(next(iter(data)))
    finally:
        for h in hooks:
            h.remove()
    return found


def _sum_error(q: torch.Tensor, u: torch.Tensor, z: torch.Tensor) -> float:
    """Mean |sum of integers - sum of x/s| over the filters (in steps)."""
    return float(((q.double() - z.double()) - u.double()).flatten(2).sum(2).abs().mean())


@torch.no_grad()
def preserve_filter_sums(sim, *, layers: Union[str, list[str]] = "input", data: Optional[Iterable] = None
                         ) -> DCRoundReport:
    """Round the weights of the sim's convolutions so each filter keeps its sum (in place; see the module
    docstring). ``layers``: ``"input"`` (default) the convolutions that read a model input, ``"all"`` every
    quantized convolution whose kernel has more than one tap, or a list of names. ``data``: batches, needed
    only for ``"input"`` in leaf mode (its first batch runs once). Returns a :class:`DCRoundReport`."""
    t0 = time.perf_counter()
    found = _candidates(sim)
    if layers == "input":
        readers = input_readers(sim, data)
        found = {n: m for n, m in found.items() if n in readers}
    elif layers != "all":
        unknown = sorted(set(layers) - set(found))
        if unknown:
            raise ValueError(f"not quantized convolutions with a kernel of more than one tap: {unknown}")
        found = {n: found[n] for n in layers}
    report = DCRoundReport()
    for name, m in found.items():
        q = m.param_quantizers["weight"] if "weight" in m.param_quantizers else None
        if not isinstance(q, Quantizer):
            report.skipped[name] = "its weight is not quantized"
            continue
        if q.is_frozen:
            report.skipped[name] = "its weight quantizer is frozen (rounding already decided, e.g. by AdaRound)"
            continue
        w = m.weight.detach().float()
        g = q.spec.granularity
        s = expand_param(q.scale, w.shape, g).float().expand_as(w)
        if bool((s.flatten(2).amax(2) != s.flatten(2).amin(2)).any()):
            report.skipped[name] = "its weight scale varies within a filter"
            continue
        near = quantize(w, q.scale, q.zero_point, q.qmin, q.qmax, g)
        kept = quantize_sum_preserving(w, q.scale, q.zero_point, q.qmin, q.qmax, g)
        u, z = w / s, expand_param(q.zero_point, w.shape, g)
        report.layers[name] = (_sum_error(near, u, z), _sum_error(kept, u, z))
        report.changed[name] = float((near != kept).float().mean())
        m.weight.data.copy_(dequantize(kept, q.scale, q.zero_point, g).to(m.weight.dtype))
        q.freeze()
    report.seconds = time.perf_counter() - t0
    return report
