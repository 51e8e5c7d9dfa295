r"""Batch norm kept in training during QAT, its folding simulated on every batch.

Static folding (what :class:`~edgequant.QuantSim` does by default) trains the folded layer: the batch
norm is gone and its statistics with it. The other scheme the literature compares (Jacob et al., CVPR
2018, section 3.2; Krishnamoorthi, 2018, section 3.2) keeps the batch norm: the weight is folded with the
*running* statistics before it is quantized, so the quantized weight is the one that will be deployed,

.. math::
    k = \gamma / \sqrt{\sigma^2_{run} + \epsilon},\qquad
    y = \mathrm{BN}_{batch}\big(\mathrm{conv}(x,\ Q(W k)) / k + b\big)

in training (the division undoes the folding, so the batch norm normalizes with the statistics of the
batch and updates its running ones), and, once the statistics are frozen (after ``freeze_bn_after``
training batches) or in eval mode, exactly the folded layer the integer runtime executes,

.. math::
    y = \mathrm{conv}(x,\ Q(W k)) + \beta + (b - \mu_{run}) k .

:func:`simulate_bn_folding` turns the batch norms after conv/linear layers of a sim built with
``fold_bn=False`` into this; :func:`fold_simulated_bn` folds them for good (bit-identical outputs in
eval mode: the weight is folded by the same float32 expression the quantizer saw), after which the sim
exports and runs in integers like a statically folded one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..graph import ops
from ..graph.bn_fold import why_not_foldable
from ..graph.patterns import bn_producer, module_of, set_submodule
from ..nn.modules import QuantizedModuleMixin

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_CLASS_CACHE: dict[type, type] = {}


class SimulatedBnFold:
    """Mixin of a quantized conv/linear layer that computes the batch norm after it (``self.bn``, which stays
    registered where it was, as a pass-through in the graph: the float model and its state_dict names keep it)."""

    #: export and the integer engine refuse a layer with it (fold first)
    simulates_bn = True
    bn: nn.Module

    def bn_factor(self) -> torch.Tensor:
        bn = self.bn
        k = torch.rsqrt(bn.running_var + bn.eps)
        return k * bn.weight if bn.affine else k

    def folded_weight(self, k: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weight folded with the running statistics (``k``: :meth:`bn_factor`, when the caller has it)."""
        w = self._parameters["weight"]
        return w * (self.bn_factor() if k is None else k).view([-1] + [1] * (w.dim() - 1))

    def folded_bias(self, k: Optional[torch.Tensor] = None) -> torch.Tensor:
        bn, b = self.bn, self._parameters.get("bias")
        shift = (b if b is not None else 0) - bn.running_mean
        return shift * (self.bn_factor() if k is None else k) + (bn.bias if bn.affine else 0)

    def quantized_input(self, pname: str) -> torch.Tensor:
        """What the quantizer of ``pname`` sees (calibration reads it): the folded weight."""
        return self.folded_weight().detach() if pname == "weight" else super().quantized_input(pname)

    @property
    def bn_frozen(self) -> bool:
        return self.freeze_bn_after is not None and int(self.bn_batches) >= self.freeze_bn_after

    def forward(self, x):
        batch = self.training and not self.bn_frozen
        w, b = self._parameters["weight"], self._parameters.get("bias")
        k = self.bn_factor()
        self._parameters["weight"] = self.folded_weight(k)
        self._parameters["bias"] = None if batch else self.folded_bias(k)
        try:
            y = super().forward(x)
        finally:
            self._parameters["weight"], self._parameters["bias"] = w, b
        if not batch:
            return y
        self.bn_batches += 1
        shape = [1, -1] + [1] * (y.dim() - 2)
        safe = torch.where(k == 0, torch.ones_like(k), k)  # gamma = 0: the folded weight is 0 and so is y
        y = y / safe.view(shape)
        if b is not None:
            y = y + b.view(shape)
        return self._bn_float_forward(self.bn, y)


def _simulated_class(cls: type) -> type:
    if cls not in _CLASS_CACHE:
        # this module's name: passes that read a layer's attributes (AdaRound, CLE) skip it as an own-forward layer
        _CLASS_CACHE[cls] = type(f"BnFolded{cls.__name__}", (SimulatedBnFold, cls), {"__module__": __name__})
    return _CLASS_CACHE[cls]


def _held_class(cls: type) -> type:
    """``cls`` (a BatchNorm class) whose forward passes its input through: its layer computes it."""
    if cls not in _CLASS_CACHE:
        _CLASS_CACHE[cls] = type(f"Held{cls.__name__}", (cls,), {"forward": lambda self, x: x, "__module__": __name__})
    return _CLASS_CACHE[cls]


@dataclass
class BnFolding:
    """``pairs``: ``(layer, batchnorm)`` names simulated; ``skipped``: ``(batchnorm, reason)``."""
    pairs: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def simulate_bn_folding(sim, freeze_bn_after: Optional[int] = None) -> BnFolding:
    """Keep the batch norms of ``sim`` (built with ``fold_bn=False``) in training with their folding simulated
    per batch (see the module docstring), in place. ``freeze_bn_after``: training batches after which the
    running statistics stop updating and the layer computes as folded (``None``: never). Calibrate after
    this call: the weight quantizers must see the folded weights."""
    if sim.capture_mode != "graph":
        raise ValueError("simulated BN folding needs a sim built by graph capture")
    modules = dict(sim.model.named_modules())
    out = BnFolding()
    bns = [n for n in sim.model.graph.nodes if isinstance(module_of(n, modules), ops.BN_MODULES)]
    if not bns and sim.bn_folding.folded:
        raise ValueError("this sim folded its batch norms when it was built: build it with QuantSim(..., fold_bn=False)")
    for node in bns:
        bn = modules[node.target]
        src, single = bn_producer(node, modules)
        layer = module_of(src, modules)
        why = None
        if not (single and isinstance(layer, _FOLDABLE) and isinstance(layer, QuantizedModuleMixin)):
            why = "it does not follow a quantized conv or linear layer that only it reads"
        elif isinstance(layer, SimulatedBnFold):
            why = "its layer already simulates a batch norm"
        else:
            why = why_not_foldable(layer, bn)
        if why:
            out.skipped.append((node.target, why))
            continue
        layer.__class__ = _simulated_class(type(layer))
        object.__setattr__(layer, "bn", bn)  # a reference, not a second registration
        layer._bn_name, layer._bn_float_forward = node.target, type(bn).forward
        layer.freeze_bn_after = freeze_bn_after
        layer.register_buffer("bn_batches", torch.zeros((), dtype=torch.long, device=layer.weight.device))
        bn.__class__ = _held_class(type(bn))
        out.pairs.append((src.target, node.target))
    return out


@torch.no_grad()
def fold_simulated_bn(sim) -> list[str]:
    """Fold every simulated batch norm of ``sim`` into its layer for good (in place); returns the layers.
    In eval mode the outputs are unchanged to the last bit; the sim then exports like a folded one."""
    folded = []
    for name, m in list(sim.model.named_modules()):  # a list: the batch norms are replaced on the way
        if not isinstance(m, SimulatedBnFold):
            continue
        k = m.bn_factor()
        w, b = m.folded_weight(k), m.folded_bias(k)
        m.weight.copy_(w)
        if m.bias is None:
            m.bias = nn.Parameter(b.detach().clone())
        else:
            m.bias.copy_(b)
        bn_name = m._bn_name
        for attr in ("bn", "bn_batches", "_bn_name", "_bn_float_forward", "freeze_bn_after"):
            delattr(m, attr)
        m.__class__ = type(m).__mro__[2]  # BnFolded<Quantized<Layer>> -> Quantized<Layer>
        set_submodule(sim.model, bn_name, nn.Identity())
        sim.bn_folding.folded.append((name, bn_name))  # float_model() and copy_weights_to fold it alike
        folded.append(name)
    return folded
