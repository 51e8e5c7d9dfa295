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
:mod:`edgequant.core`; errors in :mod:`edgequant.errors`. The names below are imported on first use,
so ``import edgequant`` (and ``edgequant --help``) does not pay for torch until it is needed.
"""
import importlib

__version__ = "0.2.0"

#: public name -> the module that defines it
_EXPORTS = {
    "quantize": ".ptq", "analyze": ".analysis", "load": ".sim", "QuantSim": ".sim", "QuantSimWarning": ".sim", "CalibrationReport": ".sim",
    "RegionSim": ".sim",
    "QuantConfig": ".config", "QuantSpec": ".config", "Override": ".config", "PRESETS": ".config",
    "QuantPlan": ".config", "PlanEntry": ".config", "PerTensor": ".config", "PerChannel": ".config",
    "PerBlock": ".config", "Encoding": ".core", "Quantizer": ".nn", "register_quantized": ".nn",
    "export_onnx": ".export", "EdgequantError": ".errors", "NotCalibratedError": ".errors", "DataError": ".errors",
    "GraphCaptureError": ".errors", "ExportError": ".errors", "IntegerEngineError": ".errors", "PlanError": ".errors",
}

__all__ = list(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'edgequant' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
