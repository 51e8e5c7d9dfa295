"""Analysis: fidelity metrics (defined in :mod:`edgequant.metrics`, a low layer that PTQ uses too),
per-quantizer sensitivity (:func:`analyze`), the cost model (:func:`edgequant.sim.cost.cost`), mixed precision
and the self-contained HTML report (:func:`html_report`)."""
from ..metrics import Fidelity, fidelity, sqnr_db
from ..sim.cost import Cost, LayerCost, cost
from .html import html_report, tensor_histograms
from .mixed import FrontPoint, MixedPrecisionResult, mixed_precision
from .sensitivity import AnalysisReport, QuantizerSensitivity, analyze

__all__ = ["Fidelity", "fidelity", "sqnr_db", "analyze", "AnalysisReport", "QuantizerSensitivity", "cost", "Cost",
           "LayerCost", "mixed_precision", "MixedPrecisionResult", "FrontPoint", "html_report", "tensor_histograms"]
