"""The registry of quantized modules: how each float layer class becomes its quantized twin.

QuantSim looks a layer up here (by its class and base classes, most specific first) instead of an
``if`` chain; a quantized LSTM, a QAT conv-bn or a decomposed layer is one registration::

    @register_quantized(MyLayer, params={"weight": 0})
    def convert(module, param_quantizers):      # -> the quantized module (in place or a new one)
        ...

``params`` maps each parameter to quantize to the axis of its output channels (where ``PerChannel()``
and ``PerBlock()`` without an axis put it). ``convert`` defaults to :func:`~edgequant.nn.quantize_module`,
which keeps the layer's own ``forward`` and state_dict names and fake-quantizes the parameters.

>>> from torch import nn
>>> lookup(nn.Conv2d).params, lookup(nn.ConvTranspose2d).params, lookup(nn.ReLU) is None
({'weight': 0}, {'weight': 1}, True)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from torch import nn

from .modules import QuantizedModuleMixin, quantize_module


@dataclass(frozen=True)
class Registration:
    """How ``float_class`` is quantized: ``params`` (name -> output-channel axis) and ``convert``."""
    float_class: type
    params: Mapping[str, int] = field(default_factory=lambda: {"weight": 0})
    convert: Callable = quantize_module


_REGISTRY: dict[type, Registration] = {}


def register_quantized(float_class: type, params: Optional[Mapping[str, int]] = None, convert: Optional[Callable] = None):
    """Register how layers of ``float_class`` (and its subclasses) are quantized.

    Call it directly (``register_quantized(nn.Conv2d)``) or as a decorator on ``convert(module,
    param_quantizers) -> module``. A later registration of the same class replaces the earlier one.
    """
    if not (isinstance(float_class, type) and issubclass(float_class, nn.Module)):
        raise TypeError(f"register_quantized needs an nn.Module subclass, got {float_class!r}")
    params = dict(params or {"weight": 0})

    def add(fn: Optional[Callable]):
        _REGISTRY[float_class] = Registration(float_class, params, fn or quantize_module)
        return fn

    if convert is not None:
        add(convert)
        return convert
    add(None)
    return add


def lookup(cls_or_module) -> Optional[Registration]:
    """The registration for a layer class (or instance), searching its base classes; None if not registered."""
    cls = cls_or_module if isinstance(cls_or_module, type) else type(cls_or_module)
    for c in cls.__mro__:
        if c is QuantizedModuleMixin:
            continue
        if c in _REGISTRY:
            return _REGISTRY[c]
    return None


for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding, nn.EmbeddingBag):
    register_quantized(_cls, {"weight": 0})
for _cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_quantized(_cls, {"weight": 1})
