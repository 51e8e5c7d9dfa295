"""Quantized twins of torch layers, made by a mixin so a layer keeps its class and its own forward.

``quantize_module(m, {"weight": quantizer})`` turns ``m`` (say a subclass of ``nn.Conv2d`` with its
own ``forward``) into an instance of ``Quantized<Class>`` -- a subclass of both
:class:`QuantizedModuleMixin` and ``type(m)``. Its forward substitutes each quantized parameter by its
fake-quantized value for the duration of the original forward, so ``isinstance(m, nn.Conv2d)`` still
holds and state_dict names stay the same (plus ``param_quantizers.*``).
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.granularity import PerChannel, PerTensor
from ..core.quant import bias_integers, bias_scale
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

    def _quantized_bias(self, dtype=None):
        """``round(b / (s_in s_w)) * s_in s_w`` when the input and weight quantizers are active and
        calibrated (per-tensor input; per-tensor or per-output-channel weight), else None. In ``dtype``
        (float64 in integer-exact mode) if given."""
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
        s64 = bias_scale(q_in.scale.detach(), q_w.scale.detach(), channels).to(bias.device)
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
    "same" padding or weight standardization in its forward): passes that read a layer's attributes
    (BN folding, equalization, AdaRound, the ONNX export, the integer engine) would get it wrong, so
    they skip it by name or refuse it."""
    for cls in type(m).__mro__:
        if issubclass(cls, QuantizedModuleMixin):
            continue
        if (cls.__module__ or "").startswith("torch."):
            return False
        if "forward" in cls.__dict__:
            return True
    return False


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
