r"""Batch-norm folding.

A BatchNorm in eval mode is an affine map per channel, so a conv/linear followed by it (directly or
through identity ops such as dropout) computes

.. math::
    y_c = \gamma_c \frac{(W x + b)_c - \mu_c}{\sqrt{\sigma^2_c + \epsilon}} + \beta_c
        = (W'x + b')_c,\quad W'_c = \frac{\gamma_c}{\sqrt{\sigma^2_c+\epsilon}} W_c,\quad
          b'_c = \frac{\gamma_c}{\sqrt{\sigma^2_c+\epsilon}}(b_c - \mu_c) + \beta_c .

``W_c`` is output channel ``c`` of the weight (axis 0 for conv and linear, axis 1 for transposed
convolutions). The BatchNorm becomes ``nn.Identity`` (a subclass whose forward applies its child modules
after the batch norm -- timm's ``BatchNormAct2d`` -- becomes those children). Folding is exact in float up to
rounding.

The folded layer keeps what the BatchNorm said about its output -- :math:`y_c \sim N(\beta_c, \gamma_c^2)`
-- as two non-persistent buffers, ``bn_mean`` and ``bn_std``; cross-layer equalization keeps them
up to date and the data-free passes (high-bias absorption, BN-based ranges, analytical bias
correction) read them.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..nn.modules import base_class, computes_as, own_forward
from ..nn.quantizer import Quantizer
from . import ops
from .patterns import bn_producer, call_counts, module_of, set_submodule, trace


@dataclass
class FoldReport:
    """``folded``: ``(layer, batchnorm)`` names; ``skipped``: ``(batchnorm, reason)``."""
    folded: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} batch norm(s); left {len(self.skipped)}"]
        lines += [f"  left {bn}: {why}" for bn, why in self.skipped]
        return "\n".join(lines)


_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def why_not_foldable(layer: nn.Module, bn: nn.Module) -> str | None:
    """Why ``bn`` cannot fold into ``layer`` (its statistics or its channel count), or None."""
    if not bn.track_running_stats or bn.running_mean is None:
        return "it has no running statistics (track_running_stats=False)"
    axis = 1 if isinstance(layer, nn.modules.conv._ConvTransposeNd) else 0
    groups = getattr(layer, "groups", 1)
    out_channels = layer.weight.shape[axis] * (groups if axis == 1 else 1)
    if out_channels != bn.num_features:
        return f"its {bn.num_features} features do not match the {out_channels} output channels of the layer"
    return None


def folded_replacement(bn: nn.Module) -> Optional[nn.Module]:
    """What a batch norm becomes once folded into its layer: ``nn.Identity``; for a batch norm subclass whose
    forward is the batch norm followed by its child modules in order (timm's ``BatchNormAct2d``: dropout, then
    the activation; checked on a probe), those children in an ``nn.Sequential`` under their own names, so
    ``bn.act`` keeps its name and the activation stays. None when its forward computes anything else."""
    if not own_forward(bn):
        return nn.Identity().train(bn.training)
    kids = list(bn.named_children())
    if not kids:
        return None
    chain = nn.Sequential(OrderedDict(kids))
    base = base_class(type(bn))
    if not computes_as(bn, lambda x: chain(base.forward(bn, x))):
        return None
    chain.training = bn.training  # the children keep their own flags
    return chain


def channel_view(w: torch.Tensor, axis: int, groups: int = 1):
    """A function ``scale -> w * scale`` broadcasting ``scale`` (length = channels along ``axis``).

    For a transposed convolution with groups, output channel ``c`` lives at ``w[g*in_g:(g+1)*in_g, c % out_g]``
    with ``g = c // out_g``; the weight is viewed as ``(groups, in_g, out_g, ...)`` for that.
    """
    def shape_for(v):
        s = [1] * w.ndim
        s[axis] = -1
        return v.view(s)

    if axis == 1 and groups > 1:  # transposed conv: (Cin, Cout/g, k...)
        cin, out_g = w.shape[0], w.shape[1]

        def apply(v):
            wv = w.view(groups, cin // groups, out_g, *w.shape[2:])
            return (wv * v.view(groups, 1, out_g, *[1] * (w.ndim - 2))).view_as(w)
        return apply
    return lambda v: w * shape_for(v)


@torch.no_grad()
def fold_layer(layer: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` (eval-mode statistics) into ``layer`` in place; record ``bn_mean``/``bn_std`` on it."""
    axis = 1 if isinstance(layer, nn.modules.conv._ConvTransposeNd) else 0
    w = layer.weight
    inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.affine else torch.ones_like(inv_std)
    beta = bn.bias.double() if bn.affine else torch.zeros_like(inv_std)
    k = gamma * inv_std  # (C,)
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(k)
    new_w = channel_view(w.double(), axis, getattr(layer, "groups", 1))(k)
    new_b = (b - bn.running_mean.double()) * k + beta
    w.copy_(new_w.to(w.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(new_b.to(w.dtype))
    else:
        layer.bias.copy_(new_b.to(w.dtype))
    mean, std = beta.to(w.dtype), gamma.abs().to(w.dtype)
    if "bn_mean" in layer._buffers:  # folded before: keep the statistics of the last BatchNorm
        layer.bn_mean, layer.bn_std = mean, std
    else:
        layer.register_buffer("bn_mean", mean, persistent=False)
        layer.register_buffer("bn_std", std, persistent=False)


def fold_batch_norms(model: nn.Module, inplace: bool = False, example_inputs=None) -> tuple[nn.Module, FoldReport]:
    """Fold every BatchNorm that follows a conv, transposed conv or linear layer into it.

    The BatchNorm may follow the layer directly or through identity ops (dropout, ``nn.Identity``,
    ``.contiguous()``); the layer's output must have no other consumer. BatchNorms that cannot be
    folded (after a ReLU, a shared layer, a layer whose output is also used elsewhere) are left in
    place and listed in the report with the reason.

    ``example_inputs`` (optional, as for ``QuantSim``) let a model torch.fx cannot trace be read through
    ``torch.export`` instead.

    Returns ``(model, report)``: a folded copy of ``model`` (``model`` itself with ``inplace=True``).

    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    >>> folded, report = fold_batch_norms(net)
    >>> report.folded, report.skipped[0][0]
    ([('0', '1')], '3')
    >>> type(folded[1]).__name__, type(net[1]).__name__
    ('Identity', 'BatchNorm2d')
    """
    if any(isinstance(m, Quantizer) for m in model.modules()):
        raise TypeError("fold batch norms in the float model before building the QuantSim "
                        "(QuantSim and edgequant.quantize(..., ptq='auto') do this for you)")
    net = model if inplace else copy.deepcopy(model)
    if example_inputs is None:
        gm, modules = trace(net)
    else:
        from ..batches import as_args, evaluating

        with evaluating(net):  # torch.export records eval-mode batch norms (running statistics) as layers
            gm, modules = trace(net, *as_args(example_inputs))
    counts = call_counts(gm)
    report = FoldReport()
    for node in gm.graph.nodes:
        bn = module_of(node, modules)
        if not isinstance(bn, ops.BN_MODULES):
            continue
        src, chain_ok = bn_producer(node, modules)
        layer = module_of(src, modules)
        if not isinstance(layer, _FOLDABLE):
            what = "the model input" if src is not None and src.op == "placeholder" else \
                f"{type(layer).__name__ if layer is not None else getattr(src, 'target', src)}"
            report.skipped.append((node.target, f"it follows {what}, not a conv/linear layer"))
            continue
        reason = None
        if own_forward(layer):
            reason = f"{src.target} ({type(layer).__name__}) computes in its own forward, which folding cannot see into"
        elif not chain_ok:
            reason = f"the output of {src.target} is also used elsewhere"
        elif counts.get(src.target, 0) > 1 or counts.get(node.target, 0) > 1:
            reason = "the layer or the batch norm is called more than once"
        else:
            reason = why_not_foldable(layer, bn)
        replacement = None if reason else folded_replacement(bn)
        if replacement is None and not reason:
            reason = (f"{node.target} ({type(bn).__name__}) computes in its own forward, which is not a batch norm "
                      "followed by its child modules")
        if reason:
            report.skipped.append((node.target, reason))
            continue
        fold_layer(layer, bn)
        set_submodule(net, node.target, replacement)  # keeps the mode the user set
        report.folded.append((src.target, node.target))
    return net, report
