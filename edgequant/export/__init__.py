"""Deployment: ONNX QDQ export (:func:`export_onnx`) and the integer-only reference engine
(:class:`~edgequant.export.integer.IntegerEngine`). Encodings files live in :mod:`edgequant.io`."""
from .integer import IntegerEngine, IntegerEngineError
from .onnx_qdq import ExportError, export_onnx

__all__ = ["export_onnx", "ExportError", "IntegerEngine", "IntegerEngineError"]
