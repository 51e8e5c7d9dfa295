"""Typed quantization configuration: specs, overrides, presets, and the per-tensor plan they resolve to."""
from ..core.granularity import PerBlock, PerChannel, PerTensor
from .plan import PlanEntry, QuantPlan
from .spec import PRESETS, SCHEMA_VERSION, Override, QuantConfig, QuantSpec

__all__ = ["QuantSpec", "QuantConfig", "Override", "PRESETS", "SCHEMA_VERSION", "PerTensor", "PerChannel", "PerBlock",
           "QuantPlan", "PlanEntry"]
