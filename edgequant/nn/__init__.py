"""Quantizer modules, quantized twins of torch layers, and the registry that maps one to the other."""
from ..errors import NotCalibratedError
from .clamp import ChannelClamp
from .scale import ChannelScale, SigmoidMul, split_silu
from .modules import QuantizedModuleMixin, own_forward, quantize_module, quantized_class
from .quantizer import ROLES, Quantizer, make_quantizer
from .registry import Registration, TensorSite, lookup, register_quantized
from .rnn import QuantizedRecurrentMixin  # registers nn.LSTM, nn.GRU and nn.RNN

__all__ = ["ChannelClamp", "ChannelScale", "SigmoidMul", "split_silu", "Quantizer", "make_quantizer", "ROLES", "NotCalibratedError", "QuantizedModuleMixin",
           "quantize_module", "quantized_class", "own_forward", "register_quantized", "lookup", "Registration",
           "TensorSite", "QuantizedRecurrentMixin"]
