"""Quantization simulation."""
from .quantsim import CalibrationReport, QuantSim, QuantSimWarning
from .regions import RegionSim
from .saving import load

__all__ = ["QuantSim", "QuantSimWarning", "CalibrationReport", "RegionSim", "load"]
