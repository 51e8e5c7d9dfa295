r"""Loss-aware range setting for the model's output quantizer.

For a classifier the last activation quantizer sits on the logits, where a range chosen by min/max or
percentile optimizes the wrong thing: what matters is the softmax. This pass caches the values that
reach the output quantizer (with every other quantizer active) and the float model's outputs on the
same batches, then picks the clipping range ``[t_lo * min, t_hi * max]`` on a grid of shrink factors
that minimizes the cross-entropy

.. math:: -\sum_k p_k \log \mathrm{softmax}(\mathrm{fq}(z))_k

against the float model's softmax ``p`` (``target="float"``, no labels needed) or against the labels
(``target="labels"``, batches ``(inputs, labels)``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..batches import evaluating, iterate
from ..core.granularity import PerTensor
from ..core.quant import _qparams, fake_quantize, grid_range
from ..errors import NotCalibratedError
from ..nn.quantizer import Quantizer


@dataclass
class LossAwareReport:
    quantizer: str
    loss_before: float
    loss_after: float
    range_before: tuple[float, float]
    range_after: tuple[float, float]

    def __str__(self) -> str:
        return (f"loss-aware range for {self.quantizer}: [{self.range_before[0]:.3g}, {self.range_before[1]:.3g}] -> "
                f"[{self.range_after[0]:.3g}, {self.range_after[1]:.3g}], cross-entropy {self.loss_before:.4f} -> {self.loss_after:.4f}")


def output_quantizer(sim) -> Quantizer:
    """The activation quantizer on the model's (single) output."""
    if sim.capture_mode != "graph":
        raise ValueError("loss-aware output ranges need a sim built by graph capture")
    modules = dict(sim.model.named_modules())
    out = next(n for n in sim.model.graph.nodes if n.op == "output")
    val = out.args[0]
    if isinstance(val, (tuple, list)) and len(val) == 1:
        val = val[0]
    node = val if isinstance(val, torch.fx.Node) else None
    q = modules.get(node.target) if node is not None and node.op == "call_module" else None
    if not isinstance(q, Quantizer):
        raise ValueError("the model's output is not a single tensor coming straight from an activation quantizer; "
                         "name the quantizer with loss_aware_output_range(sim, data, name=...)")
    return q


@torch.no_grad()
def loss_aware_output_range(sim, data, *, name: Optional[str] = None, target: str = "float",
                            num_batches: Optional[int] = None, grid: int = 40) -> LossAwareReport:
    """Set the output quantizer's range to minimize the cross-entropy of the quantized logits (in place)."""
    if target not in ("float", "labels"):
        raise ValueError(f"target must be 'float' or 'labels', got {target!r}")
    q = sim.quantizers()[name] if name is not None else output_quantizer(sim)
    if not isinstance(q.spec.granularity, PerTensor):
        raise ValueError(f"{q.tensor_name}: loss-aware ranges support per-tensor output quantizers")
    if not q.is_initialized:
        raise NotCalibratedError(f"{q.tensor_name} has no encoding yet: call sim.calibrate(data) first")
    device = sim.device
    zs, ps = [], []
    captured = {}
    h = q.register_forward_pre_hook(lambda mod, inp: captured.__setitem__("z", inp[0].detach()))
    try:
        with evaluating(sim):
            for _, batch in iterate(data, num_batches=num_batches, device=device, desc="loss-aware range", progress=False):
                if target == "labels":
                    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                        raise ValueError("target='labels' needs batches of (inputs, labels)")
                    ps.append(F.one_hot(batch[-1].long(), num_classes=-1).float())
                else:
                    with sim.quantization_disabled():
                        ps.append(F.softmax(sim.run_batch(batch).float(), dim=-1))
                sim.run_batch(batch)
                zs.append(captured["z"].float())
    finally:
        h.remove()
    z, p = torch.cat(zs), torch.cat(ps)
    if target == "labels" and p.shape[-1] != z.shape[-1]:
        p = F.pad(p, (0, z.shape[-1] - p.shape[-1]))

    def ce(scale, zp):
        zq = fake_quantize(z, scale, zp, q.qmin, q.qmax, q.spec.granularity)
        return float(-(p * F.log_softmax(zq, dim=-1)).sum(-1).mean())

    lo0, hi0 = float(z.min().clamp(max=0)), float(z.max().clamp(min=0))
    before = tuple(float(v.flatten()[0]) for v in grid_range(q.scale, q.zero_point, q.qmin, q.qmax))
    best = (ce(q.scale, q.zero_point), q.scale.clone(), q.zero_point.clone(), before)
    loss_before = best[0]
    factors = torch.linspace(0.2, 1.0, grid).tolist()
    for t_hi in factors:
        for t_lo in (factors if not q.spec.symmetric else [t_hi]):
            lo, hi = torch.tensor([lo0 * t_lo]), torch.tensor([hi0 * t_hi])
            s, zp = _qparams(lo, hi, q.qmin, q.qmax, q.spec.symmetric)
            s, zp = s.reshape(q.scale.shape).to(device), zp.reshape(q.zero_point.shape).to(device)
            loss = ce(s, zp)
            if loss < best[0]:
                best = (loss, s, zp, (float(lo), float(hi)))
    q._set(best[1], best[2])
    return LossAwareReport(q.tensor_name, loss_before, best[0], before, best[3])
