"""Convs that compute in their own forward, rewritten as plain layers where that is what they compute.

A conv subclass with its own forward (timm's ``Conv2dSame``: TensorFlow's "same" padding; ``StdConv2d`` /
``ScaledStdConv2d``: weight standardization; ``StdConv2dSame``: both) is, at inference, a constant zero
padding of its input followed by a plain convolution with an *effective* weight. :func:`plain_convs` runs
the model once on the example inputs, records inside each such layer the ``F.pad`` and ``F.conv2d`` it
calls, and replaces the layer by an ``nn.Conv2d`` (or :class:`~edgequant.nn.padded.PaddedConv2d` when the
padding differs per side) holding the effective weight -- checked to give the same output on the recorded
input. Every pass (BN folding, CLE, AdaRound, the ONNX export, the integer engine) then sees a plain conv.

The rewrite holds for the input size of the example (the "same" padding depends on it) and freezes the
weight transform: QAT trains the effective weight. Layers whose forward does anything else are left as
they are (and passes skip them by name).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..nn.modules import own_forward
from ..nn.padded import PaddedConv2d
from .patterns import computes_the_same, first_calls, set_submodule

_CONVS = {"conv2d"}
_PADS = {"pad", "_pad", "constant_pad_nd"}


class _Record(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.calls.append((getattr(func, "__name__", str(func)), args, kwargs, out))
        return out


def _effective(m: nn.Module, x: torch.Tensor):
    """``(pads, weight, bias, stride, dilation, groups)`` of the one conv ``m`` computes on ``x``, or None."""
    rec = _Record()
    with torch.no_grad(), rec:
        y = m(x)
    convs = [c for c in rec.calls if c[0] in _CONVS]
    if len(convs) != 1 or convs[0][3] is not y:
        return None
    _, args, kwargs, _ = convs[0]
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    a = dict(zip(names, args), **kwargs)
    xin, w = a["input"], a["weight"]
    stride, padding, dilation = (tuple(a.get(k, d)) if isinstance(a.get(k, d), (tuple, list)) else (a.get(k, d),) * 2
                                 for k, d in (("stride", 1), ("padding", 0), ("dilation", 1)))
    if any(isinstance(p, str) for p in padding):
        return None
    pads = [padding[1], padding[1], padding[0], padding[0]]  # left, right, top, bottom
    if xin is not x:
        pad = [c for c in rec.calls if c[0] in _PADS and c[3] is xin]
        if len(pad) != 1 or pad[0][1][0] is not x:
            return None
        _, pargs, pkw, _ = pad[0]
        p = list(pargs[1] if len(pargs) > 1 else pkw.get("pad"))
        mode = pargs[2] if len(pargs) > 2 else pkw.get("mode", "constant")
        value = pargs[3] if len(pargs) > 3 else pkw.get("value", 0.0)
        if mode != "constant" or (value or 0) != 0 or len(p) != 4:
            return None
        pads = [pads[i] + p[i] for i in range(4)]
    return pads, w.detach().clone(), a.get("bias"), stride, dilation, a.get("groups", 1)


def plain_convs(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, str]:
    """Rewrite ``model``'s own-forward 2-D convs in place as plain ones (see the module docstring); returns
    ``{layer: what it became}``."""
    todo = {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and type(m) not in (nn.Conv2d, PaddedConv2d) and own_forward(m)}
    if not todo:
        return {}
    calls = first_calls(model, todo, args, kwargs)
    if calls is None:
        return {}
    inputs = {name: a[0].detach() for name, (a, _) in calls.items() if a and isinstance(a[0], torch.Tensor)}
    done = {}
    for name, m in todo.items():
        x = inputs.get(name)
        if x is None or m.padding_mode != "zeros":
            continue
        flags = [(mod, mod.training) for mod in m.modules()]
        m.train(False)
        try:
            found = _effective(m, x)
            if found is None:
                continue
            pads, w, b, stride, dilation, groups = found
            symmetric = pads[0] == pads[1] and pads[2] == pads[3]
            kw = dict(stride=stride, dilation=dilation, groups=groups, bias=b is not None, device=w.device, dtype=w.dtype)
            if symmetric:
                new = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, padding=(pads[2], pads[0]), **kw)
            else:
                new = PaddedConv2d(m.in_channels, m.out_channels, m.kernel_size, padding=0, pads=pads, **kw)
            with torch.no_grad():
                new.weight.copy_(w)
                if b is not None:
                    new.bias.copy_(b.detach())
            new.weight.requires_grad_(m.weight.requires_grad)
            with torch.no_grad():
                ref, got = m(x), new(x)
            if not computes_the_same(ref, got):
                continue
        finally:
            for mod, t in flags:
                mod.training = t
        new.train(m.training)
        set_submodule(model, name, new)
        done[name] = f"{type(m).__name__} -> {type(new).__name__}" + (f" pads {tuple(pads)}" if not symmetric else "")
    return done
