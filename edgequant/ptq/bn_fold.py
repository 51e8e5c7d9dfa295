"""Batch-norm folding, as a post-training pass (it lives in :mod:`edgequant.graph.bn_fold`, below the
sim, because :class:`~edgequant.sim.QuantSim` folds batch norms itself by default)."""
from ..graph.bn_fold import FoldReport, channel_view, fold_batch_norms, fold_layer

__all__ = ["FoldReport", "channel_view", "fold_batch_norms", "fold_layer"]
