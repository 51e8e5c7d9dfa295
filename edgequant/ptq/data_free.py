r"""Data-free statistics: per-channel moments propagated from batch-norm parameters.

A BatchNorm says its output in channel ``c`` is about ``N(beta_c, gamma_c^2)``; folding keeps that as
``bn_mean``/``bn_std`` on the folded layer. :func:`propagate_moments` pushes these through the sim's
graph with a few rules:

* a layer with BN statistics: ``N(bn_mean, bn_std^2)`` (before its activation);
* a layer without: ``E[y] = (sum_k W) E[x] + b``, ``Var[y] = (sum_k W^2) Var[x]`` (channels assumed
  independent);
* ReLU, ReLU6, Hardtanh, :class:`~edgequant.nn.ChannelClamp`: moments of the clipped normal
  ``clamp(X, a, b)``, ``X ~ N(mu, sigma^2)``, with ``alpha = (a - mu) / sigma``, ``beta = (b - mu) / sigma``:

  .. math::
     E[Y] = a\Phi(\alpha) + b(1-\Phi(\beta)) + \mu(\Phi(\beta)-\Phi(\alpha)) + \sigma(\phi(\alpha)-\phi(\beta))

     E[Y^2] = a^2\Phi(\alpha) + b^2(1-\Phi(\beta)) + (\mu^2+\sigma^2)(\Phi(\beta)-\Phi(\alpha))
              + 2\mu\sigma(\phi(\alpha)-\phi(\beta)) + \sigma^2(\alpha\phi(\alpha)-\beta\phi(\beta))

* add: means and variances add; identity ops, pools and flattening of a ``(N, C, 1, 1)`` tensor
  keep the moments;
* anything else: unknown.

Each value also carries a per-channel range: ``mean +/- n_std * std`` for Gaussian values, clamped by
the activations. :func:`set_bn_ranges` turns those ranges into activation encodings, so a model can be
quantized with no data at all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import fx, nn

from ..core.quant import choose_qparams
from ..graph import ops, patterns
from ..graph.patterns import activation_bounds, is_add, is_pool
from ..nn.quantizer import Quantizer

_RESHAPES_FUNCTIONS = {torch.flatten}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze"}


@dataclass
class Moments:
    """Per-channel statistics of one tensor; ``axis`` is its channel axis (1, or -1 for linear features)."""
    mean: torch.Tensor
    std: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    axis: int = 1

    @classmethod
    def gaussian(cls, mean, std, n_std: float, axis: int = 1) -> "Moments":
        mean, std = mean.double(), std.double().abs()
        return cls(mean, std, mean - n_std * std, mean + n_std * std, axis)


def _phi(x):
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _Phi(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def clipped_normal_moments(mu: torch.Tensor, sigma: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """``(E[Y], Std[Y])`` of ``Y = clamp(X, a, b)``, ``X ~ N(mu, sigma^2)`` (a may be -inf, b +inf).

    >>> m, s = clipped_normal_moments(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([math.inf]))
    >>> round(m.item(), 4), round(s.item(), 4)  # half-normal: 1/sqrt(2 pi), sqrt(1/2 - 1/(2 pi))
    (0.3989, 0.5838)
    """
    mu, sigma = mu.double(), sigma.double()
    a, b = torch.as_tensor(a, dtype=torch.float64).expand_as(mu), torch.as_tensor(b, dtype=torch.float64).expand_as(mu)
    tiny = sigma < 1e-12
    sg = torch.where(tiny, torch.ones_like(sigma), sigma)
    al, be = (a - mu) / sg, (b - mu) / sg
    Pa, Pb = _Phi(al), _Phi(be)
    pa, pb = _phi(al), _phi(be)
    fa = torch.where(torch.isinf(a), torch.zeros_like(a), a)  # a * Phi(alpha) -> 0 when a = -inf
    fb = torch.where(torch.isinf(b), torch.zeros_like(b), b)
    apa = torch.where(torch.isinf(al), torch.zeros_like(al), al * pa)
    bpb = torch.where(torch.isinf(be), torch.zeros_like(be), be * pb)
    mid = Pb - Pa
    m1 = fa * Pa + fb * (1 - Pb) + mu * mid + sg * (pa - pb)
    m2 = fa * fa * Pa + fb * fb * (1 - Pb) + (mu * mu + sg * sg) * mid + 2 * mu * sg * (pa - pb) + sg * sg * (apa - bpb)
    var = (m2 - m1 * m1).clamp(min=0)
    const = torch.minimum(torch.maximum(mu, a), b)
    return torch.where(tiny, const, m1), torch.where(tiny, torch.zeros_like(var), var.sqrt())


def _weighted_moments(m: nn.Module, x: Moments, n_std: float) -> Moments:
    w = m.weight.detach().double()
    groups = getattr(m, "groups", 1)
    cout, cin_g = w.shape[0], w.shape[1]
    wsum = w.reshape(cout, cin_g, -1).sum(2).view(groups, cout // groups, cin_g)  # (G, Cout/G, Cin/G)
    w2sum = (w * w).reshape(cout, cin_g, -1).sum(2).view(groups, cout // groups, cin_g)
    mean_in = x.mean.view(groups, 1, cin_g)
    var_in = (x.std * x.std).view(groups, 1, cin_g)
    mean = (wsum * mean_in).sum(-1).reshape(cout)
    var = (w2sum * var_in).sum(-1).reshape(cout)
    if m.bias is not None:
        mean = mean + m.bias.detach().double()
    return Moments.gaussian(mean, var.sqrt(), n_std, axis=-1 if isinstance(m, nn.Linear) else 1)


def propagate_moments(gm: fx.GraphModule, n_std: float = 6.0,
                      inputs: Optional[dict[str, Moments]] = None) -> dict[fx.Node, Optional[Moments]]:
    """Per-channel :class:`Moments` of every node of ``gm`` that the rules above can derive (else None).

    ``inputs`` maps placeholder names to the moments of the model's inputs (unknown if absent).
    Activation quantizer nodes (``activation_quantizers.*``) are treated as identity.
    """
    modules = dict(gm.named_modules())
    inputs = inputs or {}
    out: dict[fx.Node, Optional[Moments]] = {}
    for n in gm.graph.nodes:
        first = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        x = out.get(first) if first is not None else None
        m = patterns.module_of(n, modules)
        res = None
        if n.op == "placeholder":
            res = inputs.get(n.target)
        elif isinstance(m, Quantizer) or ops.is_identity(n, modules) or is_pool(n, modules):
            res = x
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            if "bn_mean" in m._buffers:
                res = Moments.gaussian(m.bn_mean, m.bn_std, n_std, axis=-1 if isinstance(m, nn.Linear) else 1)
            elif x is not None and x.mean.numel() == m.weight.shape[1] * getattr(m, "groups", 1):
                res = _weighted_moments(m, x, n_std)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and m.affine:
            res = Moments.gaussian(m.bias.detach(), m.weight.detach(), n_std)
        elif (ab := activation_bounds(n, modules)) is not None and x is not None:
            a, b = ab
            mean, std = clipped_normal_moments(x.mean, x.std, a, b)
            at = torch.as_tensor(a, dtype=torch.float64)
            bt = torch.as_tensor(b, dtype=torch.float64)
            res = Moments(mean, std, torch.minimum(torch.maximum(x.lo, at), bt), torch.minimum(torch.maximum(x.hi, at), bt), x.axis)
        elif is_add(n) and len(n.args) == 2 and all(isinstance(a, fx.Node) for a in n.args):
            a, b = out.get(n.args[0]), out.get(n.args[1])
            if a is not None and b is not None and a.mean.shape == b.mean.shape:
                res = Moments.gaussian(a.mean + b.mean, (a.std ** 2 + b.std ** 2).sqrt(), n_std, a.axis)
        elif x is not None and ((n.op == "call_function" and n.target in _RESHAPES_FUNCTIONS)
                                or (n.op == "call_method" and n.target in _RESHAPE_METHODS)):
            meta = n.meta.get("tensor_meta")
            shape = getattr(meta, "shape", None)
            if shape is not None and len(shape) == 2 and shape[1] == x.mean.numel():
                res = Moments(x.mean, x.std, x.lo, x.hi, axis=-1)
        out[n] = res
    return out


def _input_moments(input_stats, n_std: float) -> dict[str, Moments]:
    res = {}
    for name, (mean, std) in (input_stats or {}).items():
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float64).reshape(-1)
        if mean.shape != std.shape:
            mean, std = torch.broadcast_tensors(mean, std)
        res[name] = Moments.gaussian(mean, std, n_std)
    return res


@dataclass
class BNRangeReport:
    set: list[str]
    from_input_ranges: list[str]


@torch.no_grad()
def set_bn_ranges(sim, n_std: float = 6.0, input_ranges: Optional[dict] = None,
                  input_stats: Optional[dict] = None) -> BNRangeReport:
    """Data-free activation encodings: each activation quantizer gets ``[min_c lo_c, max_c hi_c]`` of
    the value it quantizes (see :func:`propagate_moments`); weights are calibrated from themselves.

    Args:
        sim: a :class:`~edgequant.QuantSim` built by graph capture on a model whose batch norms were
            folded (or are still there).
        n_std: how many standard deviations around the mean the range covers.
        input_ranges: ``{input name: (lo, hi)}`` for the model inputs' quantizers (for an image
            normalized with ImageNet statistics, ``(-2.12, 2.64)``).
        input_stats: ``{input name: (mean, std)}`` (floats or per-channel sequences) so that layers
            after the input get statistics too.

    Raises ValueError naming every activation quantizer whose range cannot be derived.
    """
    if sim.capture_mode != "graph":
        raise ValueError("data-free ranges need a sim built by graph capture; this one fell back to leaf modules")
    gm = sim.model
    moments = propagate_moments(gm, n_std, _input_moments(input_stats, n_std))
    modules = dict(gm.named_modules())
    input_ranges = dict(input_ranges or {})
    for m in modules.values():
        if hasattr(m, "param_quantizers"):
            for pname, q in m.param_quantizers.items():
                if isinstance(q, Quantizer):
                    q.calibrate_from(getattr(m, pname))
    done, from_inputs, missing = [], [], []
    for n in gm.graph.nodes:
        q = patterns.module_of(n, modules)
        if not isinstance(q, Quantizer):
            continue
        src = n.args[0]
        if src.op == "placeholder" and src.target in input_ranges:
            lo, hi = (torch.tensor(float(v)) for v in input_ranges.pop(src.target))
            from_inputs.append(q.tensor_name)
        else:
            mo = moments.get(src)
            if mo is None:
                missing.append(q.tensor_name)
                continue
            lo, hi = mo.lo.min().float(), mo.hi.max().float()
        lo, hi = torch.minimum(lo, torch.zeros(())), torch.maximum(hi, torch.zeros(()))
        if not q.spec.signed:
            lo = torch.zeros(())
        scale, zp = choose_qparams(lo.reshape(1), hi.reshape(1), q.qmin, q.qmax, q.spec.symmetric)
        shape = q.scale.shape
        q._set(scale[0].expand(shape).clone(), zp[0].expand(shape).clone())
        done.append(q.tensor_name)
    if missing:
        raise ValueError(
            f"no data-free range for {len(missing)} activation quantizer(s): {', '.join(missing[:8])}"
            f"{', ...' if len(missing) > 8 else ''}. Give the model inputs' ranges (input_ranges={{'x': (lo, hi)}}) and "
            "statistics (input_stats={'x': (mean, std)}), or calibrate these with data (sim.calibrate)")
    if input_ranges:
        raise ValueError(f"input_ranges names {sorted(input_ranges)}, which are not quantized model inputs")
    return BNRangeReport(done, from_inputs)
