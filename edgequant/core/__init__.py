"""Pure tensor math of quantization (imports only torch)."""
from .encoding import Encoding, granularity_from_dict, granularity_to_dict
from .granularity import Granularity, PerBlock, PerChannel, PerTensor, check_granularity, resolve_axis
from .quant import MIN_SCALE, choose_qparams, dequantize, fake_quantize, qrange, quantize, quantize_sum_preserving

__all__ = [
    "Encoding", "Granularity", "PerTensor", "PerChannel", "PerBlock", "check_granularity", "resolve_axis",
    "MIN_SCALE", "qrange", "choose_qparams", "quantize", "quantize_sum_preserving", "dequantize", "fake_quantize",
    "granularity_to_dict", "granularity_from_dict",
]
