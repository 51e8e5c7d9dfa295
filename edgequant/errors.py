"""The errors edgequant raises on purpose: one family, so ``except EdgequantError`` catches them all.

Each also derives from the builtin a caller would expect (``ValueError`` for bad input,
``RuntimeError`` for a state or capability problem), so existing ``except ValueError`` code keeps working.
"""
from __future__ import annotations


class EdgequantError(Exception):
    """Base class of every error edgequant raises on purpose; the message says what to do."""


class NotCalibratedError(EdgequantError, RuntimeError):
    """A quantizer was used (run, saved, exported) before it had an encoding: calibrate or load encodings first."""


class DataError(EdgequantError, ValueError):
    """Calibration or evaluation data that cannot be used: empty, NaN/Inf, or batches the model cannot run."""


class GraphCaptureError(EdgequantError, RuntimeError):
    """The model could not be captured as a graph; the message names the op and source line."""


class ExportError(EdgequantError, RuntimeError):
    """The sim cannot be exported as asked; the message names the op or quantizer and what to do."""


class IntegerEngineError(EdgequantError, RuntimeError):
    """The sim has an op (or a grid) the integer engine has no implementation for."""


class RequantError(EdgequantError, ValueError):
    """A scale that a requantization scheme cannot represent."""


class PlanError(EdgequantError, ValueError):
    """A quantization plan that does not fit the model, or a plan file that cannot be read."""
