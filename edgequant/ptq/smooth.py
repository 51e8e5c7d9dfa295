r"""Input smoothing for linear layers fed by a LayerNorm: 8-bit integer GEMMs for transformers.

A transformer's LayerNorm outputs carry a few outlier channels (large LayerNorm gains; Bondarenko et
al., 2021). The ``w8a8_transformer`` preset keeps them on a 16-bit grid, which is accurate but leaves
every linear layer that reads them without an 8-bit input, so no runtime runs those layers as
integer GEMMs. Smoothing (Xiao et al., SmoothQuant, 2023) moves the outliers into the weights: for the
linear layers ``L_1..L_k`` that read LayerNorm output ``x``, with per-input-channel factors ``s_c``

    x'_c = x_c / s_c,      W'_{j,c} = W_{j,c} s_c,      L_i(x) = W' x' + b   (exact in float)

with ``s_c = max|x_c|^alpha / max_i max_j |W_{i,j,c}|^(1 - alpha)``. The division is a
:class:`~edgequant.nn.ChannelScale` inserted between the LayerNorm and those layers only: the residual
path keeps the LayerNorm output itself (on its 16-bit grid), the layers read ``x'`` on an 8-bit grid
and export as ONNX Runtime's fused integer ``QGemm``; the scale is a float ``Mul`` before it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
from torch import fx, nn

from ..batches import as_args, device_of, evaluating, iterate, run_batch
from ..graph.capture import capture
from ..nn.scale import ChannelScale


@dataclass
class SmoothReport:
    #: LayerNorm name -> the linear layers that now read its smoothed output
    groups: dict[str, list[str]] = field(default_factory=dict)
    #: per LayerNorm: largest / median channel magnitude before and after smoothing
    spread: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __str__(self) -> str:
        s = f"smoothed the inputs of {sum(len(v) for v in self.groups.values())} linear layer(s) after {len(self.groups)} LayerNorm(s)"
        if self.spread:
            before = sorted(v[0] for v in self.spread.values())
            after = sorted(v[1] for v in self.spread.values())
            s += f"; channel max/median: {before[-1]:.0f}x -> {after[-1]:.0f}x at worst"
        return s


def _groups(gm: fx.GraphModule, modules: dict) -> dict[fx.Node, list[fx.Node]]:
    """LayerNorm nodes and the linear layers that read their output as their input (a layer also called
    on another input elsewhere is left alone: its scaled weights would change that call)."""
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    out = {}
    for n in gm.graph.nodes:
        if n.op != "call_module" or not isinstance(modules.get(n.target), nn.LayerNorm):
            continue
        users = [u for u in n.users if u.op == "call_module" and isinstance(modules.get(u.target), nn.Linear)
                 and u.args[0] is n and len(u.args) == 1 and calls[u.target] == 1]
        if users:
            out[n] = users
    return out


def _channel_absmax(net: nn.Module, layers: list[nn.Module], data, n_positional, num_batches, forward_fn, progress):
    """Per last-axis channel ``max |y|`` of each layer's output over ``data``."""
    found: list[Optional[torch.Tensor]] = [None] * len(layers)

    def hook(i):
        def post(_mod, _args, y):
            r = y.detach().abs().reshape(-1, y.shape[-1]).amax(0).double()
            found[i] = r if found[i] is None else torch.maximum(found[i], r)
        return post

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(layers)]
    try:
        with evaluating(net):
            for _, batch in iterate(data, num_batches=num_batches, device=device_of(net), desc="smoothing", progress=progress):
                run_batch(net, batch, n_positional, forward_fn=forward_fn)
    finally:
        for h in handles:
            h.remove()
    return found


@torch.no_grad()
def smooth_linear_inputs(model: nn.Module, data: Iterable, *, alpha: float = 0.5, num_batches: Optional[int] = None,
                         forward_fn: Optional[Callable] = None, example_inputs=None, inplace: bool = False,
                         progress: bool = False) -> tuple[nn.Module, SmoothReport]:
    """Smooth the inputs of the linear layers that read a LayerNorm's output (see the module docstring).

    Args:
        model: a float model (a transformer).
        data: calibration batches (as for :meth:`QuantSim.calibrate`).
        alpha: how much of each channel's range moves into the weights (0: none, 1: all).
        example_inputs: inputs to capture the graph with (default: the first batch of ``data``).
        inplace: change ``model``'s layers themselves instead of a copy's.

    Returns ``(graph module, report)``: the captured model with :class:`~edgequant.nn.ChannelScale` layers
    inserted; its output equals the model's up to float rounding. ``model`` itself when there is nothing
    to smooth.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    net = model if inplace else copy.deepcopy(model)
    report = SmoothReport()
    if example_inputs is None:
        example_inputs = next(iter(data))
    args, kwargs = as_args(example_inputs)
    gm = capture(net, args, kwargs)
    modules = dict(gm.named_modules())
    groups = _groups(gm, modules)
    if not groups:
        return model if not inplace else net, report
    norms = list(groups)
    ranges = _channel_absmax(gm, [modules[n.target] for n in norms], data, len(args), num_batches, forward_fn, progress)
    for norm, users, a in zip(norms, groups.values(), ranges):
        if a is None:
            continue
        w = torch.stack([modules[u.target].weight.detach().abs().amax(0).double() for u in users]).amax(0)
        s = (a.clamp(min=1e-5) ** alpha / w.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
        name = f"{norm.target.replace('.', '_')}_smooth"
        gm.add_submodule(name, ChannelScale(1.0 / s))  # on the device of the observed activations
        with gm.graph.inserting_after(norm):
            scaled = gm.graph.call_module(name, (norm,))
        for u in users:
            u.replace_input_with(norm, scaled)
            modules[u.target].weight.mul_(s.to(modules[u.target].weight))
        report.groups[norm.target] = [u.target for u in users]
        xs = a / s
        report.spread[norm.target] = (float(a.max() / a.median().clamp(min=1e-12)), float(xs.max() / xs.median().clamp(min=1e-12)))
    gm.graph.lint()
    gm.recompile()
    return gm, report
