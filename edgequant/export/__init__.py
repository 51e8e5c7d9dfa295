"""Exports: encodings files."""
from .encodings import atomic_write_text, to_aimet, to_edgequant

__all__ = ["atomic_write_text", "to_aimet", "to_edgequant"]
