r"""Activation equalization at depthwise inputs: per-channel activation ranges on a per-tensor grid.

A depthwise convolution reads each channel on its own, and MobileNet-style networks feed it channels
whose ranges differ by orders of magnitude (a per-tensor 8-bit grid sized for the widest channel leaves
the narrow ones a handful of steps). For a pair ``L1 -> [ReLU / ReLU6 / identity] -> depthwise L2``,
dividing output channel ``c`` of ``L1`` by ``s_c`` and multiplying channel ``c`` of ``L2`` by ``s_c``
leaves the float model unchanged (ReLU6 becomes a :class:`~edgequant.nn.ChannelClamp` with bounds
``6 / s_c``, as in cross-layer equalization). Here ``s_c = r_c / max(r)`` with ``r_c`` the channel's
observed range at ``L2``'s input, so every channel spans the same range and the per-tensor quantizer
there acts like a per-channel one.

With per-channel weights the transform costs nothing elsewhere: scaling a weight row by ``s_c`` scales
its per-channel grid with it, so both layers keep the same integer weights (up to float rounding). It
is what OpenVINO/NNCF obtain with per-channel activation quantizers at depthwise inputs, but the result
stays a per-tensor activation grid that ONNX Runtime's fused ``QLinearConv`` and the integer engine run
as they are. With per-tensor weights it would move the spread into the weights (the problem CLE
solves), so :func:`edgequant.quantize` applies it only when weights are per-channel.

On MobileNetV2 (W8A8 per-channel, BN folded, 128 calibration crops) it takes the logit SQNR from 16.9
to 18.9 dB with bias correction (``benchmarks/results/splits.md`` has every partition).

:func:`edgequant.quantize` calibrates the quantizers at the equalized inputs with the *median* of per-crop
extremes (``range_method="median_minmax"``, :func:`set_input_range_method`) instead of their mean: on
MobileNetV2 over five photo partitions it raised the mean logit SQNR by 0.05 dB (128 calibration crops)
and 0.32 dB (256), nine of ten columns up, one down. The two rules differ by 0.3-2.5% of the range
there, and the result is sensitive to such small changes (``benchmarks/results/splits.md``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from ..batches import device_of, evaluating, iterate, run_batch
from ..graph.patterns import equalization_pairs
from ..nn.quantizer import Quantizer
from .bn_fold import FoldReport, fold_batch_norms
from .cle import _channel_clamps, _scale_pair, trace_unshared

#: channels whose range is below this fraction of the widest are scaled by it, not more (a near-dead
#: channel would otherwise get weights 1e6 times larger for no gain)
MIN_SCALE = 1e-3


@dataclass
class ActEqReport:
    fold: Optional[FoldReport] = None
    pairs: list[tuple[str, str]] = field(default_factory=list)
    replaced_activations: list[str] = field(default_factory=list)
    #: per pair: widest / narrowest channel range before (what a per-tensor grid had to span)
    spread: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        s = f"equalized the inputs of {len(self.pairs)} depthwise layer(s)"
        if self.spread:
            vals = sorted(self.spread.values())
            s += f"; channel range spread before: median {vals[len(vals) // 2]:.0f}x, max {vals[-1]:.0f}x"
        return s


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d | nn.Conv1d | nn.Conv3d) and m.groups > 1 and m.groups == m.in_channels \
        and m.out_channels == m.in_channels


@torch.no_grad()
def equalize_activations(model: nn.Module, data: Iterable, *, num_batches: Optional[int] = None,
                         forward_fn: Optional[Callable] = None, fold: bool = True, inplace: bool = False,
                         progress: bool = False, example_inputs=None) -> tuple[nn.Module, ActEqReport]:
    """Equalize the channel ranges at every depthwise layer's input (see the module docstring).

    Args:
        model: a float model.
        data: calibration batches (as for :meth:`QuantSim.calibrate`); each channel's range is its
            largest magnitude over them.
        fold: fold batch norms first (a layer followed by a BatchNorm cannot be scaled).
        inplace: change ``model`` itself instead of a copy.
        example_inputs: read a model torch.fx cannot trace through torch.export (as for ``QuantSim``).

    Returns ``(model, report)``; the float model's output is unchanged up to float rounding.

    >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU6(), nn.Conv2d(4, 4, 3, groups=4)).eval()
    >>> with torch.no_grad(): _ = net[0].weight.mul_(torch.tensor([1.0, 10, 100, 0.1]).view(4, 1, 1, 1))
    >>> x = [torch.randn(2, 3, 8, 8)]
    >>> eq, report = equalize_activations(net, x)
    >>> report.pairs, torch.allclose(eq(x[0]), net(x[0]), atol=1e-5)
    ([('0', '2')], True)
    """
    net = model if inplace else copy.deepcopy(model)
    report = ActEqReport()
    if fold:
        net, report.fold = fold_batch_norms(net, inplace=True, example_inputs=example_inputs)
    net, gm, modules = trace_unshared(net, example_inputs)
    pairs = [p for p in equalization_pairs(gm, modules)
             if _is_depthwise(modules[p.second]) and p.act_kind in ("none", "relu", "clamp")]
    if not pairs:
        return net, report
    ranges = _input_ranges(net, [modules[p.second] for p in pairs], data, num_batches, forward_fn, progress)
    acts = _channel_clamps(net, pairs, modules, report.replaced_activations)
    for p, r in zip(pairs, ranges):
        if r is None or not bool((r > 0).any()):
            continue
        top = r.max()
        s = torch.where(r > 0, (r / top).clamp(min=MIN_SCALE), torch.ones_like(r))
        alive = r[r > 0]
        report.spread[p.second] = float(top / alive.min())
        _scale_pair(modules[p.first], modules[p.second], acts[p.first], s.float())
        report.pairs.append((p.first, p.second))
    return net, report


def _input_ranges(net, layers: list[nn.Module], data, num_batches, forward_fn, progress) -> list[Optional[torch.Tensor]]:
    """Per input channel ``max |x|`` at each layer's input over ``data`` (channels on axis 1)."""
    ranges: list[Optional[torch.Tensor]] = [None] * len(layers)

    def hook(i):
        def pre(_mod, args):
            x = args[0].detach()
            r = x.abs().transpose(0, 1).reshape(x.shape[1], -1).amax(dim=1).double()
            ranges[i] = r if ranges[i] is None else torch.maximum(ranges[i], r)
        return pre

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(layers)]
    try:
        with evaluating(net):
            for _, batch in iterate(data, num_batches=num_batches, device=device_of(net), desc="activation equalization",
                                    progress=progress):
                run_batch(net, batch, forward_fn=forward_fn)
    finally:
        for h in handles:
            h.remove()
    return ranges


def set_input_range_method(sim, layers: Iterable[str], method: str = "median_minmax",
                           replaces: tuple[str, ...] = ("mean_minmax",)) -> list[str]:
    """Give the activation quantizers at the inputs of ``layers`` (e.g. the equalized depthwise layers,
    ``[second for _, second in report.pairs]``) the range method ``method``, before ``sim.calibrate``.

    Only quantizers whose range method is one of ``replaces`` (the presets' default) change; one that the
    config names explicitly (``QuantConfig.module_names``) or that has another method keeps it. Layers
    without a quantized input are skipped. Returns the names of the quantizers changed.
    """
    changed = []
    for layer in layers:
        try:
            mod = sim.model.get_submodule(layer)
        except AttributeError:
            continue
        src = getattr(mod, "_bias_input", None)  # (container, key) of the quantizer this layer reads
        q = src[0][src[1]] if src is not None else None
        if not isinstance(q, Quantizer) or q.is_weight or q.spec.range_method not in replaces \
                or sim.config.names_activation(q.tensor_name) or q.tensor_name in changed:
            continue
        sim.set_spec(q.tensor_name, replace(q.spec, range_method=method))
        changed.append(q.tensor_name)
    return changed
