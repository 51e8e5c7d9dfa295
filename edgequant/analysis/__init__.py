"""Analysis: fidelity metrics."""
from .fidelity import Fidelity, fidelity, sqnr_db

__all__ = ["Fidelity", "fidelity", "sqnr_db"]
