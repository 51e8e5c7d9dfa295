"""The registry of quantized modules: how each float layer class becomes its quantized twin.

QuantSim looks a layer up here (by its class and base classes, most specific first) instead of an
``if`` chain; a quantized LSTM, a QAT conv-bn or a decomposed layer is one registration::

    @register_quantized(MyLayer, params={"weight": 0})
    def convert(module, param_quantizers):      # -> the quantized module (in place or a new one)
        ...

``params`` maps each parameter to quantize to the axis of its output channels (where ``PerChannel()``
and ``PerBlock()`` without an axis put it); a callable ``params(module)`` gives them per instance (an
LSTM's weights depend on its layers and directions). ``convert`` defaults to
:func:`~edgequant.nn.quantize_module`, which keeps the layer's own ``forward`` and state_dict names and
fake-quantizes the parameters.

A layer that computes several tensors of its own (the gates and states of a recurrent cell) lists them
with ``tensors(module) -> {suffix: TensorSite}``: each becomes a plan entry ``<layer>.<suffix>`` of role
``activation`` with its own quantizer, and ``convert(module, param_quantizers, tensor_quantizers)``
receives them.

>>> from torch import nn
>>> lookup(nn.Conv2d).params_of(nn.Conv2d(1, 1, 1)), lookup(nn.ConvTranspose2d).params, lookup(nn.ReLU) is None
({'weight': 0}, {'weight': 1}, True)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from torch import nn

from .modules import QuantizedModuleMixin, quantize_module


@dataclass(frozen=True)
class TensorSite:
    """A tensor a layer computes inside its forward (a gate, a cell state) that gets its own quantizer.

    Args:
        shape: its shape for one sample, batch first (``(1, hidden)``); channels on axis 1.
        nonneg: never negative (a sigmoid's output): ``signed=None`` resolves to unsigned.
        fixed_range: ``(lo, hi)`` known without data (a sigmoid's ``(0, 1)``): the quantizer is set to it
            once and frozen, calibration does not touch it.
        bits: the default bit-width when no ``module_names`` override names the tensor (an LSTM's cell
            state: 16, as integer LSTM kernels keep it), with min-max ranges.
    """
    shape: tuple = (1, 1)
    nonneg: bool = False
    fixed_range: Optional[tuple] = None
    bits: Optional[int] = None


@dataclass(frozen=True)
class Registration:
    """How ``float_class`` is quantized: ``params`` (name -> output-channel axis, or a callable of the
    module returning that), ``convert``, and the layer's own ``tensors`` (a callable, or None)."""
    float_class: type
    params: object = field(default_factory=lambda: {"weight": 0})
    convert: Callable = quantize_module
    tensors: Optional[Callable] = None

    def params_of(self, module: nn.Module) -> Mapping[str, int]:
        """``{parameter name: output-channel axis}`` for this instance."""
        return dict(self.params(module) if callable(self.params) else self.params)

    def tensors_of(self, module: nn.Module) -> Mapping[str, TensorSite]:
        """``{suffix: TensorSite}`` of the tensors the layer quantizes inside its forward."""
        return dict(self.tensors(module)) if self.tensors is not None else {}


_REGISTRY: dict[type, Registration] = {}


def register_quantized(float_class: type, params=None, convert: Optional[Callable] = None,
                       tensors: Optional[Callable] = None):
    """Register how layers of ``float_class`` (and its subclasses) are quantized.

    Call it directly (``register_quantized(nn.Conv2d)``) or as a decorator on ``convert(module,
    param_quantizers) -> module`` (``convert(module, param_quantizers, tensor_quantizers)`` when
    ``tensors`` is given). A later registration of the same class replaces the earlier one.
    """
    if not (isinstance(float_class, type) and issubclass(float_class, nn.Module)):
        raise TypeError(f"register_quantized needs an nn.Module subclass, got {float_class!r}")
    if tensors is not None and not callable(tensors):
        raise TypeError("tensors must be a callable: tensors(module) -> {suffix: TensorSite}")
    params = params if callable(params) else dict(params or {"weight": 0})

    def add(fn: Optional[Callable]):
        if tensors is not None and fn is None:
            raise TypeError("a registration with tensors needs its own convert(module, param_quantizers, tensor_quantizers)")
        _REGISTRY[float_class] = Registration(float_class, params, fn or quantize_module, tensors)
        return fn

    if convert is not None:
        add(convert)
        return convert
    if tensors is None:
        add(None)  # registered now with the default convert; a decorator may replace it
    return add


def lookup(cls_or_module) -> Optional[Registration]:
    """The registration for a layer class (or instance), searching its base classes; None if not registered."""
    cls = cls_or_module if isinstance(cls_or_module, type) else type(cls_or_module)
    for c in cls.__mro__:
        if issubclass(c, QuantizedModuleMixin):
            continue
        if c in _REGISTRY:
            return _REGISTRY[c]
    return None


for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding, nn.EmbeddingBag):
    register_quantized(_cls, {"weight": 0})
for _cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_quantized(_cls, {"weight": 1})
