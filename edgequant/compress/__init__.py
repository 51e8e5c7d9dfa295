"""Compression beside quantization: low-rank factorization of layers (weight SVD, spatial SVD) with per-layer
ratios chosen for a whole-model target (:func:`compress`). The result is a plain ``nn.Module``."""
from .select import CompressResult, LayerChoice, compress, layer_macs, layer_shapes
from .svd import factorize, is_factorable, rank_for_ratio, spatial_svd, weight_svd

__all__ = ["compress", "CompressResult", "LayerChoice", "layer_macs", "layer_shapes", "factorize", "is_factorable",
           "rank_for_ratio", "spatial_svd", "weight_svd"]
