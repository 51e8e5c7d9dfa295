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
from .patterns import computes_the_same, layer_calls, set_submodule

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
    def own_conv(m):
        return isinstance(m, nn.Conv2d) and type(m) not in (nn.Conv2d, PaddedConv2d) and own_forward(m)

    done = {}
    for name, m, a, _ in layer_calls(model, own_conv, args, kwargs):
        x = a[0].detach() if a and isinstance(a[0], torch.Tensor) else None
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


#: torch functions a transposed linear layer computes with: ``addmm(bias, x, W)``, ``x @ W (+ b)``, ``F.linear``
_PRODUCTS = {"addmm", "matmul", "mm", "linear", "__matmul__"}


def _effective_linear(m: nn.Module, x: torch.Tensor):
    """``(weight (out, in), bias or None)`` of the one affine map on the last dimension that ``m`` computes with its own
    2-D ``weight`` on ``x`` (Hugging Face's transposed ``Conv1D``: ``addmm(bias, x.view(-1, nx), weight)``), or None."""
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None
    rec = _Record()
    with torch.no_grad(), rec:
        m(x)
    found = [c for c in rec.calls if c[0] in _PRODUCTS and any(a is w for a in list(c[1]) + list(c[2].values()))]
    if len(found) != 1 or sum(c[0] in _PRODUCTS for c in rec.calls) != 1:
        return None
    name, args, kwargs, _ = found[0]
    b = getattr(m, "bias", None)
    b = b if b is not None and any(a is b for a in list(args) + list(kwargs.values())) else None  # added by the product
    # F.linear(x, weight, bias) holds the weight as nn.Linear does; addmm(bias, x, W) and x @ W hold it (in, out)
    return (w.detach().clone() if name == "linear" else w.detach().t().contiguous()), b


def _linear_candidate(m: nn.Module) -> bool:
    """A leaf layer of the model's own code (not torch's, not a registered one) whose parameters are a 2-D ``weight``
    and maybe a 1-D ``bias``: it may be a linear layer written by hand."""
    from ..nn.registry import lookup

    if type(m).__module__.startswith("torch.") or lookup(type(m)) is not None or list(m.children()):
        return False
    params = dict(m.named_parameters(recurse=False))
    w, b = params.get("weight"), params.get("bias")
    return (w is not None and w.dim() == 2 and set(params) <= {"weight", "bias"} and (b is None or b.dim() == 1)
            and not list(m.buffers(recurse=False)))


def plain_linears(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, str]:
    """Rewrite ``model``'s transposed linear layers in place as ``nn.Linear`` (Hugging Face's ``Conv1D`` in GPT-2 and
    its relatives: a ``weight`` of shape (in, out) and ``addmm(bias, x, weight)`` in its forward), so that every pass
    and the export see a linear layer with a quantized weight instead of float ``addmm`` nodes. Each rewrite is checked
    to give the same output on the layer's input from the example inputs; returns ``{layer: what it became}``."""
    done = {}
    for name, m, a, _ in layer_calls(model, _linear_candidate, args, kwargs):
        x = a[0].detach() if a and isinstance(a[0], torch.Tensor) else None
        if x is None or not x.dtype.is_floating_point:
            continue
        found = _effective_linear(m, x)
        if found is None:
            continue
        w, b = found
        new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.weight.copy_(w)
            if b is not None:
                new.bias.copy_(b.detach())
            ref, got = m(x), new(x)
        if not computes_the_same(ref, got):
            continue
        new.weight.requires_grad_(m.weight.requires_grad)
        new.train(m.training)
        set_submodule(model, name, new)
        done[name] = f"{type(m).__name__} -> Linear (weight transposed)"
    return done
