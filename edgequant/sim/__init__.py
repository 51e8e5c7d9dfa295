"""Quantization simulation."""
from .quantsim import CalibrationReport, QuantSim, QuantSimWarning
from .saving import load

__all__ = ["QuantSim", "QuantSimWarning", "CalibrationReport", "load"]
