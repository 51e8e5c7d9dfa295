"""Typed quantization configuration: specs, overrides, presets."""
from ..core.granularity import PerBlock, PerChannel, PerTensor
from .spec import PRESETS, SCHEMA_VERSION, Override, QuantConfig, QuantSpec

__all__ = ["QuantSpec", "QuantConfig", "Override", "PRESETS", "SCHEMA_VERSION", "PerTensor", "PerChannel", "PerBlock"]
