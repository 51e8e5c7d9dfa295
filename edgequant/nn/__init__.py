"""Quantizer modules and quantized twins of torch layers."""
from .clamp import ChannelClamp
from .modules import QuantizedModuleMixin, quantize_module, quantized_class
from .quantizer import NotCalibratedError, Quantizer

__all__ = ["ChannelClamp", "Quantizer", "NotCalibratedError", "QuantizedModuleMixin", "quantize_module", "quantized_class"]
