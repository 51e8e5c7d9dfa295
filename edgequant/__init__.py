"""edgequant: quantize trained PyTorch networks to low-precision integer arithmetic.

Typical use::

    sim = edgequant.QuantSim(model, example_input, config="w8a8")
    sim.calibrate(calibration_batches)
    sim.save_encodings("model.encodings.json")

or, with the post-training techniques chosen for you::

    result = edgequant.quantize(model, calibration_batches, recipe="w4a8", ptq="auto")
    result.sim, result.encodings, print(result.report)
"""
from .config import PRESETS, Override, PerBlock, PerChannel, PerTensor, QuantConfig, QuantSpec
from .core import Encoding, choose_qparams, dequantize, fake_quantize, qrange
from .graph import GraphCaptureError
from .nn import NotCalibratedError, Quantizer
from .sim import CalibrationReport, QuantSim, QuantSimWarning
from .ptq import quantize  # the one-call pipeline; the tensor-level quantize() is edgequant.core.quantize

__version__ = "0.1.0"

__all__ = [
    "quantize", "QuantSim", "QuantSimWarning", "CalibrationReport", "QuantConfig", "QuantSpec", "Override", "PRESETS",
    "PerTensor", "PerChannel", "PerBlock", "Encoding", "Quantizer", "NotCalibratedError", "GraphCaptureError",
    "qrange", "choose_qparams", "dequantize", "fake_quantize", "__version__",
]
