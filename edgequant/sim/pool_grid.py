"""A global average pool's output grid is never finer than its input step divided by the pooled count.

The mean of ``N`` values on a grid of step ``s_x`` is a multiple of ``s_x / N``: an output grid finer
than that represents nothing more, and ONNX Runtime's ``QLinearGlobalAveragePool`` refuses a
multiplier ``s_x / (s_y N)`` of 256 or more ("parameter out of computation range", seen on
EfficientNet's squeeze-and-excitation pools, whose pooled values span a sliver of their input's
range). After calibration such an output grid is widened to step ``s_x / N`` (its range grows, so
nothing more is clipped), and one coarser than the input's own grid (an output that saw only zeros) takes
the input's grid, which holds every mean of its values. An add input that saw only zeros takes the add's output scale
(:func:`settle_empty_add_inputs`).
"""
from __future__ import annotations

import math

import torch
from torch import fx

from ..core.granularity import PerTensor
from ..core.quant import choose_qparams
from ..graph import lowering, ops, patterns
from ..nn.modules import QuantizedModuleMixin
from ..nn.quantizer import Quantizer


def _pooled_count(pool, modules) -> int:
    meta = patterns.recorded_meta(pool.args[0])
    if meta is None or not hasattr(meta, "shape"):
        return 0
    dims, _ = patterns.pool_dims(pool, modules, len(meta.shape))
    return math.prod(int(meta.shape[d]) for d in dims)


def _activation_grids(sim):
    """``(node, quantizer, modules)`` for every calibrated per-tensor activation quantizer of a graph-mode sim."""
    if sim.capture_mode != "graph":
        return
    modules = dict(sim.model.named_modules())
    for n in sim.model.graph.nodes:
        q = patterns.module_of(n, modules)
        if isinstance(q, Quantizer) and not q.is_weight and q.is_initialized and isinstance(q.spec.granularity, PerTensor):
            yield n, q, modules


def _quantizer_node(n, modules):
    """The quantizer node whose value reaches node ``n`` through identity ops, or None."""
    while isinstance(n, fx.Node) and not isinstance(patterns.module_of(n, modules), Quantizer) and ops.is_identity(n, modules):
        n = n.args[0]
    return n if isinstance(n, fx.Node) and isinstance(patterns.module_of(n, modules), Quantizer) else None


@torch.no_grad()
def cap_pool_grids(sim) -> list[str]:
    """Fix every too-fine or too-coarse global-pool output grid of a calibrated graph-mode sim; returns their names."""
    changed = []
    for n, q, modules in _activation_grids(sim):
        if q.is_frozen or not patterns.is_global_pool(n.args[0], modules):
            continue
        pool = n.args[0]
        qx = lowering.source_quantizer(pool.args[0], modules, through=ops.is_identity)
        count = _pooled_count(pool, modules)
        if not isinstance(qx, Quantizer) or not qx.is_initialized or not isinstance(qx.spec.granularity, PerTensor) or not count:
            continue
        floor = float(qx.scale.detach()) / count
        s, z = float(q.scale.detach()), float(q.zero_point)
        if s > float(qx.scale.detach()) and (q.qmin, q.qmax) == (qx.qmin, qx.qmax):
            # coarser than the input's grid (an output that saw only zeros gets scale 1): the mean of values on
            # the input grid stays in the input's range, so the input's grid serves (and keeps ORT's multiplier
            # s_x / (s_y N) above its floor of 2**-32)
            q._set(qx.scale.detach().clone().reshape(q.scale.shape), qx.zero_point.detach().clone().reshape(q.zero_point.shape))
            changed.append(q.tensor_name)
            continue
        if s >= floor:
            continue
        f = floor / s
        lo, hi = s * (q.qmin - z) * f, s * (q.qmax - z) * f
        scale, zp = choose_qparams(torch.tensor([lo]), torch.tensor([hi]), q.qmin, q.qmax, q.spec.symmetric)
        q._set(scale.reshape(q.scale.shape), zp.reshape(q.zero_point.shape))
        changed.append(q.tensor_name)
    return changed


def _reads_into_layer(n, modules) -> bool:
    """Whether a weighted layer reads node ``n``'s value (through identity ops): its bias grid depends on the scale."""
    for u in n.users:
        if isinstance(patterns.module_of(u, modules), QuantizedModuleMixin):
            return True
        if ops.is_identity(u, modules) and _reads_into_layer(u, modules):
            return True
    return False


@torch.no_grad()
def settle_empty_add_inputs(sim) -> list[str]:
    """An add input that saw only zeros (a dead branch, or a random-weight block whose last batch norm is zeroed) takes
    its add's output scale; returns the names changed.

    An all-zero tensor gets scale 1 (any grid holds zero), but ONNX Runtime's ``QLinearAdd`` computes in float32 with
    the zero points as stored (uint8: 128 for a symmetric grid): ``q_b * r_b + (z_y - r_b * 128 - ...)`` with
    ``r_b = s_b / s_y``. On random-weight EfficientNetV2-M the add's output scale was 7e-9, so ``r_b = 1.5e8`` and the two
    terms of 2e10 cancelled to within float32's spacing of 2048: every output landed up to 251 steps off, the deployed
    model (and the integer-exact sim, which reproduces ORT) -7.9 dB from FP32 while the fake-quantized sim was 24.9 dB.
    With the output's scale ``r_b = 1``. Inputs a weighted layer also reads keep their scale (their bias grid)."""
    changed = []
    for n, q, modules in _activation_grids(sim):
        base, _ = patterns.split_producer(n.args[0], modules)
        if not (patterns.is_add(base) and len(base.args) >= 2):
            continue
        for src in filter(None, (_quantizer_node(a, modules) for a in base.args[:2])):
            qa = patterns.module_of(src, modules)
            if (qa is not q and qa.is_initialized and not qa.is_frozen and qa.range_collapsed
                    and isinstance(qa.spec.granularity, PerTensor) and not _reads_into_layer(src, modules)
                    and not math.isclose(float(qa.scale), float(q.scale))):
                qa._set(q.scale.detach().clone().reshape(qa.scale.shape), qa.zero_point.detach().clone())
                changed.append(qa.tensor_name)
    return changed
