"""File formats below the sim: encodings files (edgequant JSON, AIMET 1.0.0) and atomic writes."""
from .encodings import atomic_write_text, parse_encodings, read_encodings, to_aimet, to_edgequant

__all__ = ["atomic_write_text", "read_encodings", "parse_encodings", "to_edgequant", "to_aimet"]
