r"""Cross-layer equalization (CLE) and high-bias absorption (Nagel et al., "Data-Free Quantization", 2019).

**Equalization.** For two layers joined by a positively homogeneous activation,
``y = W_2 f(W_1 x + b_1) + b_2``, dividing output channel ``c`` of layer 1 by ``s_c > 0`` and
multiplying input channel ``c`` of layer 2 by ``s_c`` leaves ``y`` unchanged:
``f(x / s) = f(x) / s`` for ReLU, LeakyReLU, PReLU and the identity. With the per-channel weight
ranges ``r_1[c] = max|W_1[c, :]|`` and ``r_2[c] = max|W_2[:, c]|``,

.. math::  s_c = \sqrt{r_1[c] / r_2[c]}

makes both ranges :math:`\sqrt{r_1[c]\, r_2[c]}`, which is what a per-tensor grid wants. Chains of
three or more layers (conv -> depthwise conv -> conv) are equalized pair by pair until the scales stop
changing. ReLU6 does not commute with the scaling (``relu6(x) / s = clamp(x / s, 0, 6 / s)``), so it
is replaced by a :class:`~edgequant.nn.ChannelClamp` with bounds ``6 / s_c``: the float model stays
exact and MobileNet-style networks get equalized too.

**High-bias absorption.** Equalization can leave large biases in layer 1. Where layer 1 was
followed by a BatchNorm (whose statistics ``bn_mean``/``bn_std`` folding recorded), its
pre-activation in channel ``c`` is about ``N(beta_c, gamma_c^2)``; with
``h_c = max(0, beta_c - n * gamma_c)`` (n = 3), ``relu(x - h) = relu(x) - h`` for all but a tail of
the inputs, so ``h`` moves from layer 1's bias into layer 2's: ``b_1 -= h``, ``b_2 += W_2 h``
(``W_2`` summed over its kernel). Unlike the scaling this is not exact; pass ``example_inputs`` to
have the change in the float output measured in the report. A layer 2 with zero padding is skipped:
its padded borders would see ``-h`` instead of 0 (on MobileNetV2 absorbing into the padded depthwise
convs as well costs the float model 14.6 dB of logit SQNR instead of 30 dB).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx, nn

from ..batches import as_args, evaluating
from ..graph.patterns import Pair, equalization_pairs, set_submodule, split_shared_activations, trace
from ..metrics import sqnr_db
from ..nn.clamp import ChannelClamp
from .bn_fold import FoldReport, fold_batch_norms


@dataclass
class CLEReport:
    fold: Optional[FoldReport] = None
    pairs: list[tuple[str, str]] = field(default_factory=list)
    iterations: int = 0
    replaced_activations: list[str] = field(default_factory=list)  # ReLU6/Hardtanh -> ChannelClamp
    absorbed: dict[str, float] = field(default_factory=dict)  # first layer -> sum of bias moved on
    sqnr_db_scaling: Optional[float] = None  # float output vs the original model, after scaling
    sqnr_db_absorption: Optional[float] = None  # ... after high-bias absorption as well

    def __str__(self) -> str:
        s = f"equalized {len(self.pairs)} layer pair(s) in {self.iterations} sweep(s)"
        if self.replaced_activations:
            s += f"; {len(self.replaced_activations)} ReLU6/Hardtanh -> ChannelClamp"
        if self.absorbed:
            s += f"; high bias absorbed in {len(self.absorbed)} layer(s)"
        if self.sqnr_db_scaling is not None:
            s += f"; float SQNR vs original: scaling {self.sqnr_db_scaling:.1f} dB"
        if self.sqnr_db_absorption is not None:
            s += f", + absorption {self.sqnr_db_absorption:.1f} dB"
        return s


def _in_channel_expand(v: torch.Tensor, w2: torch.Tensor, groups: int) -> torch.Tensor:
    """Per input channel values ``v`` (Cin,) laid out like ``w2[:, :, 0...]``: (Cout, Cin/groups)."""
    cout, cin_g = w2.shape[0], w2.shape[1]
    return v.view(groups, 1, cin_g).expand(groups, cout // groups, cin_g).reshape(cout, cin_g)


def _in_channel_range(w2: torch.Tensor, groups: int) -> torch.Tensor:
    """``max |w2[:, c]|`` for every input channel c: (Cin,)."""
    cout, cin_g = w2.shape[0], w2.shape[1]
    r = w2.abs().reshape(cout, cin_g, -1).amax(dim=2)  # (Cout, Cin/g)
    return r.view(groups, cout // groups, cin_g).amax(dim=1).reshape(-1)


def _scale_pair(l1: nn.Module, l2: nn.Module, act: Optional[nn.Module], s: torch.Tensor) -> None:
    """Divide output channel c of l1 by s[c], multiply input channel c of l2 by s[c] (in place)."""
    shape1 = [-1] + [1] * (l1.weight.ndim - 1)
    l1.weight.div_(s.view(shape1).to(l1.weight.dtype))
    if l1.bias is not None:
        l1.bias.div_(s.to(l1.bias.dtype))
    if "bn_mean" in l1._buffers:
        l1.bn_mean.div_(s)
        l1.bn_std.div_(s)
    if isinstance(act, ChannelClamp):
        act.lo.div_(s)
        act.hi.div_(s)
    g = getattr(l2, "groups", 1)
    S = _in_channel_expand(s.to(l2.weight.dtype), l2.weight, g)
    l2.weight.mul_(S.view(*S.shape, *[1] * (l2.weight.ndim - 2)))


def trace_unshared(net: nn.Module, example_inputs=None) -> tuple[nn.Module, fx.GraphModule, dict]:
    """``(model, graph, modules)`` where every call of a shared activation module has its own copy;
    the model is then the graph module itself (the original class cannot express the copies). With
    ``example_inputs``, a model torch.fx cannot trace is read through torch.export."""
    if example_inputs is None:
        gm, modules = trace(net)
    else:
        with evaluating(net):
            gm, modules = trace(net, *as_args(example_inputs))
    if split_shared_activations(gm):
        return gm, gm, dict(gm.named_modules())
    return net, gm, modules


def _channel_clamps(net, pairs: list[Pair], modules: dict, replaced: list) -> dict[str, Optional[nn.Module]]:
    """Each pair's activation module, ReLU6/Hardtanh replaced by a :class:`ChannelClamp` (names appended
    to ``replaced``) so that its bounds can be scaled per channel; keyed by the pair's first layer."""
    acts: dict[str, Optional[nn.Module]] = {}
    for p in pairs:
        a = modules.get(p.act) if p.act is not None else None
        if p.act_kind == "clamp" and not isinstance(a, ChannelClamp):
            c = ChannelClamp.from_module(a, modules[p.first].weight.shape[0])
            if isinstance(modules[p.first], nn.Linear):
                c.channel_axis = -1
            c.to(modules[p.first].weight.device)
            set_submodule(net, p.act, c)
            modules[p.act] = c
            replaced.append(p.act)
            a = c
        acts[p.first] = a
    return acts


def _run(model, example_inputs):
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


@torch.no_grad()
def cross_layer_equalization(model: nn.Module, example_inputs=None, *, absorb_high_bias: bool = True,
                             n_std: float = 3.0, fold: bool = True, inplace: bool = False,
                             max_sweeps: int = 100, tol: float = 1e-4) -> tuple[nn.Module, CLEReport]:
    """Fold batch norms, equalize weight ranges across layer pairs, then absorb high biases.

    Args:
        model: a float model (eval mode is assumed for its batch norms).
        example_inputs: optional input batch; when given, the report holds the float output's SQNR
            against the original model after scaling and after absorption.
        absorb_high_bias: run :func:`absorb_high_biases` after the scaling.
        n_std: the ``n`` of high-bias absorption.
        fold: fold batch norms first (:func:`~edgequant.ptq.fold_batch_norms`); without folding, a
            layer followed by a BatchNorm is not equalized.
        inplace: change ``model`` itself instead of a copy.

    Returns ``(model, report)``. A model that calls one activation module in several places (a single
    ``nn.ReLU6`` shared by every block) comes back as an ``fx.GraphModule`` in which each call has its
    own copy, so that each pair gets its own per-channel clamp.

    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 4, 1)).eval()
    >>> x = torch.randn(2, 3, 8, 8)
    >>> eq, report = cross_layer_equalization(net, x, absorb_high_bias=False)
    >>> report.pairs, type(eq[2]).__name__, report.sqnr_db_scaling > 100
    ([('0', '3')], 'ChannelClamp', True)
    """
    net = model if inplace else copy.deepcopy(model)
    ref = _run(model, example_inputs) if example_inputs is not None else None
    report = CLEReport()
    if fold:
        net, report.fold = fold_batch_norms(net, inplace=True, example_inputs=example_inputs)
    net, gm, modules = trace_unshared(net, example_inputs)
    pairs = equalization_pairs(gm, modules)
    acts = _channel_clamps(net, pairs, modules, report.replaced_activations)
    report.pairs.extend((p.first, p.second) for p in pairs)
    for sweep in range(1, max_sweeps + 1):
        worst = 0.0
        for p in pairs:
            l1, l2 = modules[p.first], modules[p.second]
            r1 = l1.weight.detach().abs().reshape(l1.weight.shape[0], -1).amax(dim=1).double()
            r2 = _in_channel_range(l2.weight.detach(), getattr(l2, "groups", 1)).double()
            ok = (r1 > 0) & (r2 > 0)
            s = torch.where(ok, torch.sqrt(r1 / torch.where(ok, r2, torch.ones_like(r2))), torch.ones_like(r1))
            worst = max(worst, float(s.log().abs().max())) if s.numel() else worst
            _scale_pair(l1, l2, acts[p.first], s.float())
        report.iterations = sweep
        if worst < tol:
            break
    if ref is not None:
        report.sqnr_db_scaling = sqnr_db(ref, _run(net, example_inputs))
    if absorb_high_bias:
        report.absorbed = _absorb(net, pairs, modules, acts, n_std)
        if ref is not None:
            report.sqnr_db_absorption = sqnr_db(ref, _run(net, example_inputs))
    return net, report


def _absorb(net, pairs: list[Pair], modules, acts, n_std: float) -> dict[str, float]:
    absorbed = {}
    for p in pairs:
        l1, l2, act = modules[p.first], modules[p.second], acts[p.first]
        if "bn_mean" not in l1._buffers or p.act_kind not in ("relu", "clamp") or l1.bias is None:
            continue
        if isinstance(act, ChannelClamp) and not bool((act.lo == 0).all()):
            continue
        if any(v != 0 for v in getattr(l2, "padding", (0,))) or getattr(l2, "padding", 0) == "same":
            continue  # zero padding would read the shift -h at the borders: not absorbable
        h = (l1.bn_mean - n_std * l1.bn_std).clamp(min=0)  # (C,)
        if isinstance(act, ChannelClamp):
            h = torch.minimum(h, act.hi)
        if not bool((h > 0).any()):
            continue
        g = getattr(l2, "groups", 1)
        wsum = l2.weight.reshape(l2.weight.shape[0], l2.weight.shape[1], -1).sum(dim=2)  # (Cout, Cin/g)
        delta = (wsum * _in_channel_expand(h.to(wsum.dtype), l2.weight, g)).sum(dim=1)  # (Cout,)
        l1.bias.sub_(h.to(l1.bias.dtype))
        l1.bn_mean.sub_(h)
        if isinstance(act, ChannelClamp):
            act.hi.sub_(h)
        if l2.bias is None:
            l2.bias = nn.Parameter(delta.clone())
        else:
            l2.bias.add_(delta.to(l2.bias.dtype))
        absorbed[p.first] = float(h.sum())
    return absorbed


@torch.no_grad()
def absorb_high_biases(model: nn.Module, example_inputs=None, *, n_std: float = 3.0,
                       inplace: bool = False) -> tuple[nn.Module, CLEReport]:
    """High-bias absorption alone (see the module docstring); needs batch norms folded first."""
    net = model if inplace else copy.deepcopy(model)
    ref = _run(model, example_inputs) if example_inputs is not None else None
    with evaluating(net):
        gm, modules = trace(net, *as_args(example_inputs)) if example_inputs is not None else trace(net)
    pairs = equalization_pairs(gm, modules)
    acts = {p.first: (modules.get(p.act) if p.act is not None else None) for p in pairs}
    report = CLEReport(pairs=[(p.first, p.second) for p in pairs])
    report.absorbed = _absorb(net, pairs, modules, acts, n_std)
    if ref is not None:
        report.sqnr_db_absorption = sqnr_db(ref, _run(net, example_inputs))
    return net, report
