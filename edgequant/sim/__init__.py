"""Quantization simulation."""
from .quantsim import CalibrationReport, QuantSim, QuantSimWarning

__all__ = ["QuantSim", "QuantSimWarning", "CalibrationReport"]
