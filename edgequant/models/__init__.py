"""Real models that ship offline."""
from .minilm import SentenceEncoder, minilm_l6_v2, tokenize
from .mobilenet import mobilenet_v2_imagenet, mobilenet_v2_weights_path

__all__ = ["mobilenet_v2_imagenet", "mobilenet_v2_weights_path", "minilm_l6_v2", "SentenceEncoder", "tokenize"]
