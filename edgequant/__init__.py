"""edgequant: quantize trained PyTorch networks to low-precision integer arithmetic.

Typical use::

    sim = edgequant.QuantSim(model, example_input, config="w8a8")
    sim.calibrate(calibration_batches)
    sim.save_encodings("model.encodings.json")
    edgequant.export_onnx(sim, "model.onnx")

or, with the post-training techniques chosen for you::

    result = edgequant.quantize(model, calibration_batches, recipe="w4a8", ptq="auto")
    result.sim, result.encodings, print(result.report)

Tensor primitives (``quantize``, ``dequantize``, ``fake_quantize``, ``qrange``, ...) live in
:mod:`edgequant.core`; errors in :mod:`edgequant.errors`.
"""
from .config import PRESETS, Override, PerBlock, PerChannel, PerTensor, PlanEntry, QuantConfig, QuantPlan, QuantSpec
from .core import Encoding
from .errors import (DataError, EdgequantError, ExportError, GraphCaptureError, IntegerEngineError, NotCalibratedError,
                     PlanError)
from .nn import Quantizer, register_quantized
from .sim import CalibrationReport, QuantSim, QuantSimWarning, load
from .ptq import quantize  # the one-call pipeline; the tensor-level quantize() is edgequant.core.quantize
from .export import export_onnx

__version__ = "0.2.0"

__all__ = [
    "quantize", "load", "QuantSim", "QuantSimWarning", "CalibrationReport", "QuantConfig", "QuantSpec", "Override", "PRESETS",
    "QuantPlan", "PlanEntry", "PerTensor", "PerChannel", "PerBlock", "Encoding", "Quantizer", "register_quantized",
    "export_onnx", "EdgequantError", "NotCalibratedError", "DataError", "GraphCaptureError", "ExportError",
    "IntegerEngineError", "PlanError", "__version__",
]
