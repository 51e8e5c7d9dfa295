"""edgequant: quantize trained PyTorch networks to low-precision integer arithmetic.

Typical use::

    sim = edgequant.QuantSim(model, example_input, config="w8a8")
    sim.calibrate(calibration_batches)
    sim.save_encodings("model.encodings.json")
"""
from .config import PRESETS, Override, PerBlock, PerChannel, PerTensor, QuantConfig, QuantSpec
from .core import Encoding, choose_qparams, dequantize, fake_quantize, qrange, quantize
from .graph import GraphCaptureError
from .nn import NotCalibratedError, Quantizer
from .sim import CalibrationReport, QuantSim, QuantSimWarning

__version__ = "0.1.0"

__all__ = [
    "QuantSim", "QuantSimWarning", "CalibrationReport", "QuantConfig", "QuantSpec", "Override", "PRESETS",
    "PerTensor", "PerChannel", "PerBlock", "Encoding", "Quantizer", "NotCalibratedError", "GraphCaptureError",
    "qrange", "choose_qparams", "quantize", "dequantize", "fake_quantize", "__version__",
]
