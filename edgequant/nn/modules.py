"""Quantized twins of torch layers, made by a mixin so a layer keeps its class and its own forward.

``quantize_module(m, {"weight": quantizer})`` turns ``m`` (say a subclass of ``nn.Conv2d`` with its
own ``forward``) into an instance of ``Quantized<Class>`` -- a subclass of both
:class:`QuantizedModuleMixin` and ``type(m)``. Its forward substitutes each quantized parameter by its
fake-quantized value for the duration of the original forward, so ``isinstance(m, nn.Conv2d)`` still
holds and state_dict names stay the same (plus ``param_quantizers.*``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..core.granularity import PerChannel, PerTensor
from ..core.quant import INT32_MAX, bias_integers, bias_scale
from .quantizer import Quantizer

_CLASS_CACHE: dict[tuple, type] = {}


class QuantizedModuleMixin:
    """Fake-quantizes the parameters listed in ``self.param_quantizers`` during ``forward``."""

    param_quantizers: nn.ModuleDict
    #: ``(ModuleDict, key)`` of the activation quantizer feeding this layer, set by graph preparation;
    #: the bias is then fake-quantized to int32 on the accumulator grid ``s_in * s_w``, as deployed
    _bias_input = None
    #: set by ``QuantSim.integer_exact()``: compute in float64, where products of float32 values are exact
    _exact_f64 = False

    def forward(self, *args, **kwargs):
        pq = self.param_quantizers
        if len(pq) == 0:
            return super().forward(*args, **kwargs)
        saved = {}
        exact = self._exact_f64
        if exact:
            args = tuple(a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
        try:
            bias = self._quantized_bias(torch.float64 if exact else None)
            for pname, q in pq.items():
                p = self._parameters[pname]
                saved[pname] = p
                self._parameters[pname] = q(p).double() if exact else q(p)  # a plain tensor, only while forward runs
            if exact and bias is None and self._parameters.get("bias") is not None:
                saved["bias"] = self._parameters["bias"]
                self._parameters["bias"] = saved["bias"].double()
            if bias is not None:
                saved["bias"] = self._parameters["bias"]
                self._parameters["bias"] = bias
            return super().forward(*args, **kwargs)
        finally:
            self._parameters.update(saved)

    def quantized_input(self, pname: str) -> torch.Tensor:
        """The tensor the quantizer of parameter ``pname`` quantizes (calibration reads it): the parameter
        itself, unless a subclass computes it (:mod:`edgequant.qat.bn`: the weight folded with a batch norm)."""
        return getattr(self, pname)

    def bias_grid(self) -> Optional[torch.Tensor]:
        """The accumulator grid ``s_in s_w`` (float64, one per output channel) of the int32 bias when the input and
        weight quantizers are active and calibrated (per-tensor input; per-tensor or per-output-channel weight),
        else None."""
        src = self._bias_input
        bias = self._parameters.get("bias")
        if src is None or bias is None or "weight" not in self.param_quantizers:
            return None
        q_in, q_w = src[0][src[1]], self.param_quantizers["weight"]
        if not (isinstance(q_in, Quantizer) and isinstance(q_w, Quantizer) and q_in._ready and q_w._ready
                and q_in._observer is None and isinstance(q_in.spec.granularity, PerTensor)):
            return None
        g = q_w.spec.granularity
        channels = bias.shape[0]
        if not (isinstance(g, PerTensor) or (isinstance(g, PerChannel) and q_w.scale.numel() == channels)):
            return None
        return bias_scale(q_in.scale.detach(), q_w.scale.detach(), channels).to(bias.device)

    def bias_saturates(self) -> bool:
        """Whether the bias falls outside int32 on its accumulator grid (:meth:`bias_grid`): a nearly empty input
        range. The deployed kernel then clamps it, and its int32 accumulator can wrap around."""
        s64 = self.bias_grid()
        return s64 is not None and bool((self._parameters["bias"].detach().double().abs() / s64).max() > INT32_MAX)

    def _quantized_bias(self, dtype=None):
        """``round(b / (s_in s_w)) * s_in s_w`` on the grid of :meth:`bias_grid`, or None without one. In ``dtype``
        (float64 in integer-exact mode) if given."""
        s64 = self.bias_grid()
        if s64 is None:
            return None
        bias = self._parameters["bias"]
        b = (bias_integers(bias.detach(), s64).double() * s64).to(dtype or bias.dtype)
        if bias.requires_grad and torch.is_grad_enabled() and dtype is None:
            b = bias + (b - bias).detach()  # straight through: the bias trains in QAT (same value, same bits)
        return b

    def float_class(self) -> type:
        """The torch layer class this quantized twin was made from."""
        return float_class_of(type(self))


def float_class_of(cls: type) -> type:
    """The first class of ``cls``'s MRO that is not a quantized twin or mixin (``cls`` if it is a float layer)."""
    return next(c for c in cls.__mro__ if not issubclass(c, QuantizedModuleMixin))


def own_forward(m: nn.Module) -> bool:
    """Whether ``m`` is a subclass of a torch layer that computes its own way (a conv with TensorFlow's
    "same" padding or weight standardization in its forward, a batch norm that applies an activation):
    passes that read a layer's attributes (BN folding, equalization, AdaRound, the ONNX export, the
    integer engine) would get it wrong, so they skip it by name or refuse it.

    A subclass whose forward computes what its torch base class computes (checked once per layer on a
    random probe, e.g. timm's ``Linear`` that only casts for TorchScript) is not counted."""
    found = _subclass_forward(type(m))
    if found is None or getattr(found, "edgequant_layer", False):  # ours (PaddedConv2d): the passes know it
        return False
    cached = m.__dict__.get("_eq_computes_as_base")
    if cached is None or cached[0] is not found:
        cached = (found, computes_as(m, base_class(type(m))))
        m.__dict__["_eq_computes_as_base"] = cached
    return not cached[1]


def _subclass_forward(cls: type):
    """The first non-torch class in ``cls``'s MRO (quantized twins skipped) that defines ``forward``, or None."""
    for c in cls.__mro__:
        if issubclass(c, QuantizedModuleMixin):
            continue
        if (c.__module__ or "").startswith("torch."):
            return None
        if "forward" in c.__dict__:
            return c
    return None


def base_class(cls: type) -> type:
    """The first torch class in ``cls``'s MRO (``nn.Conv2d`` for a user's ``Conv2d`` subclass)."""
    return next(c for c in cls.__mro__ if (c.__module__ or "").startswith("torch.") and not issubclass(c, QuantizedModuleMixin))


def probe_input(m: nn.Module):
    """A small random input of the shape layer ``m`` takes (its own generator: the global seed is untouched), or
    None for layers whose input shape its attributes do not tell."""
    p = next(iter(m.parameters()), None)
    if p is None:
        p = next(iter(m.buffers()), None)
    device, dtype = (p.device, p.dtype) if p is not None and p.is_floating_point() else (torch.device("cpu"), torch.float32)
    g = torch.Generator(device="cpu").manual_seed(1234)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)

    if isinstance(m, nn.Linear):
        return rnd(3, m.in_features)
    if isinstance(m, nn.modules.conv._ConvNd):
        nd = len(m.kernel_size)
        size = max(9, *(d * (k - 1) + 2 for d, k in zip(m.dilation, m.kernel_size)))
        return rnd(2, m.in_channels, *([size] * nd))
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        nd = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(base_class(type(m)), 2)
        return rnd(2, m.num_features, *([5] * nd)) * 3
    if isinstance(m, nn.LayerNorm):
        return rnd(2, *m.normalized_shape) * 3
    if isinstance(m, nn.Embedding):
        return torch.randint(0, m.num_embeddings, (2, 5), generator=g).to(device)
    return None


def computes_as(m: nn.Module, fn, x=None) -> bool:
    """Whether ``m(x)`` equals ``fn``'s result on the probe input ``x`` (default :func:`probe_input`); ``fn`` is a
    torch class (its forward is called on ``m``) or a function of ``x``. Runs with gradients off and ``m`` in eval
    mode (a batch norm's statistics are not updated); False when either raises or no probe exists."""
    x = probe_input(m) if x is None else x
    if x is None:
        return False
    flags = [(mod, mod.training) for mod in m.modules()]
    m.train(False)
    try:
        with torch.no_grad():
            own = _subclass_forward(type(m)) or float_class_of(type(m))
            y = own.forward(m, x)
            ref = fn.forward(m, x) if isinstance(fn, type) else fn(x)
        return (torch.is_tensor(y) and torch.is_tensor(ref) and y.shape == ref.shape
                and torch.allclose(y, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max().clamp_min(1))))
    except Exception:  # noqa: BLE001 -- a forward that cannot run on the probe computes its own way
        return False
    finally:
        for mod, t in flags:
            mod.training = t


def quantized_class(cls: type, mixin: type = QuantizedModuleMixin) -> type:
    """The cached ``Quantized<cls>`` subclass of ``(mixin, cls)``."""
    if issubclass(cls, mixin):
        return cls
    cls = float_class_of(cls)
    if (mixin, cls) not in _CLASS_CACHE:
        _CLASS_CACHE[mixin, cls] = type(f"Quantized{cls.__name__}", (mixin, cls), {"__module__": cls.__module__})
    return _CLASS_CACHE[mixin, cls]


def quantize_module(module: nn.Module, param_quantizers: dict[str, Quantizer]) -> nn.Module:
    """Turn ``module`` into its quantized twin in place and attach ``param_quantizers``."""
    for pname in param_quantizers:
        if not isinstance(module._parameters.get(pname), torch.Tensor):
            raise ValueError(f"{type(module).__name__} has no parameter {pname!r} to quantize")
    module.__class__ = quantized_class(type(module))
    module.param_quantizers = nn.ModuleDict(param_quantizers)
    return module
