"""Real models that ship offline."""
from .mobilenet import mobilenet_v2_imagenet, mobilenet_v2_weights_path

__all__ = ["mobilenet_v2_imagenet", "mobilenet_v2_weights_path"]
