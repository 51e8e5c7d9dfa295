"""Graph capture (torch.fx) and the table of known ops."""
from .capture import GraphCaptureError, capture

__all__ = ["capture", "GraphCaptureError"]
