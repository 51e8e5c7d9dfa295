"""Quantizer modules and quantized twins of torch layers."""
from .modules import QuantizedModuleMixin, quantize_module, quantized_class
from .quantizer import NotCalibratedError, Quantizer

__all__ = ["Quantizer", "NotCalibratedError", "QuantizedModuleMixin", "quantize_module", "quantized_class"]
