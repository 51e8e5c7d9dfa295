"""Analysis: fidelity metrics (defined in :mod:`edgequant.metrics`, a low layer that PTQ uses too)."""
from ..metrics import Fidelity, fidelity, sqnr_db

__all__ = ["Fidelity", "fidelity", "sqnr_db"]
