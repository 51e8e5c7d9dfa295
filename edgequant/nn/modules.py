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

from .quantizer import Quantizer

_CLASS_CACHE: dict[type, type] = {}


class QuantizedModuleMixin:
    """Fake-quantizes the parameters listed in ``self.param_quantizers`` during ``forward``."""

    param_quantizers: nn.ModuleDict

    def forward(self, *args, **kwargs):
        pq = self.param_quantizers
        if len(pq) == 0:
            return super().forward(*args, **kwargs)
        saved = {}
        try:
            for pname, q in pq.items():
                p = self._parameters[pname]
                saved[pname] = p
                self._parameters[pname] = q(p)  # a plain tensor, only while forward runs
            return super().forward(*args, **kwargs)
        finally:
            self._parameters.update(saved)

    def float_class(self) -> type:
        return type(self).__mro__[2]


def quantized_class(cls: type) -> type:
    """The cached ``Quantized<cls>`` subclass of ``(QuantizedModuleMixin, cls)``."""
    if issubclass(cls, QuantizedModuleMixin):
        return cls
    if cls not in _CLASS_CACHE:
        _CLASS_CACHE[cls] = type(f"Quantized{cls.__name__}", (QuantizedModuleMixin, cls), {"__module__": cls.__module__})
    return _CLASS_CACHE[cls]


def quantize_module(module: nn.Module, param_quantizers: dict[str, Quantizer]) -> nn.Module:
    """Turn ``module`` into its quantized twin in place and attach ``param_quantizers``."""
    for pname in param_quantizers:
        if not isinstance(module._parameters.get(pname), torch.Tensor):
            raise ValueError(f"{type(module).__name__} has no parameter {pname!r} to quantize")
    module.__class__ = quantized_class(type(module))
    module.param_quantizers = nn.ModuleDict(param_quantizers)
    return module
