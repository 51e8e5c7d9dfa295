r"""Channel pruning with reconstruction.

A **chain** is a convolution ``L`` (the consumer, ungrouped) whose input comes, through ops that act on each
channel alone -- batch norms, elementwise activations, depthwise convolutions -- from one producer
convolution ``P`` (ungrouped), every value on the way used by nothing else. Removing input channels of ``L``
then removes the same output channels of ``P`` and the same channels of everything between (a depthwise
conv loses whole groups): MobileNetV2's inverted-residual hidden channels, a plain CNN's feature maps.
Channels that feed an add or a concat are shared with other layers and are left alone.

Pruning a chain at ratio ``r`` keeps ``ceil(r C)`` channels:

1. **selection**: each input channel ``c`` of ``L`` is scored by ``||W_L[:, c]||_2 * RMS(x_c)`` on sampled
   inputs (what it contributes to ``L``'s output) and the best are kept;
2. **reconstruction**: ``L``'s weights (and bias) are refitted by least squares so that, from the kept
   channels of its input *in the model as pruned so far*, it reproduces the original model's output of ``L``
   on every position of the calibration batches (input patches for ``k x k`` convs) -- the error of earlier
   prunings is absorbed as well, as AIMET's channel pruning does (He et al., "Channel pruning for
   accelerating very deep neural networks", 2017); the measured channel correlations are shrunk towards
   none (``shrink``), which carries better to images the fit did not see (:func:`reconstruct`).

Every module is replaced by a plain torch layer with fewer channels; names stay.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..batches import evaluating, run_batch
from ..graph.capture import capture
from ..graph.patterns import set_submodule

#: modules that act on each channel alone (the chain passes through them)
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.Sigmoid,
                nn.Tanh, nn.Identity, nn.Dropout, nn.Mish, nn.ELU)
_BN = (nn.BatchNorm2d,)


def _depthwise(m) -> bool:
    return type(m) is nn.Conv2d and m.groups == m.in_channels == m.out_channels and m.groups > 1


def _plain_conv(m) -> bool:
    return type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)


@dataclass
class Chain:
    """``consumer`` (L) reads channels that ``producer`` (P) makes, through ``through`` (BNs, activations,
    depthwise convs, in graph order)."""
    consumer: str
    producer: str
    through: list[str] = field(default_factory=list)
    channels: int = 0


def prunable_chains(model: nn.Module, example) -> dict[str, Chain]:
    """``{consumer name: Chain}`` of ``model`` (traced with torch.fx on ``example``)."""
    args = example if isinstance(example, tuple) else (example,)
    gm = capture(model, args, {})
    mods = dict(gm.named_modules())
    chains = {}
    for n in gm.graph.nodes:
        if n.op != "call_module" or not _plain_conv(mods[n.target]) or not n.args:
            continue
        through, src = [], n.args[0]
        while (getattr(src, "op", None) == "call_module" and len(src.users) == 1
               and (isinstance(mods[src.target], _ELEMENTWISE + _BN) or _depthwise(mods[src.target]))):
            through.insert(0, src.target)
            src = src.args[0]
        if getattr(src, "op", None) == "call_module" and len(src.users) == 1 and _plain_conv(mods[src.target]):
            chains[n.target] = Chain(n.target, src.target, through, mods[n.target].in_channels)
    return chains


def _keep(t: torch.Tensor, idx, dim: int):
    return t.detach().index_select(dim, idx.to(t.device)).clone()


def apply_pruning(model: nn.Module, chain: Chain, keep: torch.Tensor) -> None:
    """Keep channels ``keep`` (sorted indices) of the chain in ``model`` (modules replaced in place); the
    consumer's weights are the kept input columns, to be refitted by :func:`reconstruct`."""
    k = len(keep)
    p = model.get_submodule(chain.producer)
    newp = nn.Conv2d(p.in_channels, k, p.kernel_size, p.stride, p.padding, p.dilation, 1, p.bias is not None).to(p.weight)
    with torch.no_grad():
        newp.weight.copy_(_keep(p.weight, keep, 0))
        if p.bias is not None:
            newp.bias.copy_(_keep(p.bias, keep, 0))
    set_submodule(model, chain.producer, newp.train(p.training))
    for name in chain.through:
        m = model.get_submodule(name)
        if _depthwise(m):
            new = nn.Conv2d(k, k, m.kernel_size, m.stride, m.padding, m.dilation, k, m.bias is not None).to(m.weight)
            with torch.no_grad():
                new.weight.copy_(_keep(m.weight, keep, 0))
                if m.bias is not None:
                    new.bias.copy_(_keep(m.bias, keep, 0))
            set_submodule(model, name, new.train(m.training))
        elif isinstance(m, _BN):
            new = nn.BatchNorm2d(k, m.eps, m.momentum, m.affine, m.track_running_stats).to(m.running_mean)
            with torch.no_grad():
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(m, attr) is not None:
                        getattr(new, attr).copy_(_keep(getattr(m, attr), keep, 0))
            set_submodule(model, name, new.train(m.training))
    c = model.get_submodule(chain.consumer)
    newc = nn.Conv2d(k, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, 1, c.bias is not None).to(c.weight)
    with torch.no_grad():
        newc.weight.copy_(_keep(c.weight, keep, 1))
        if c.bias is not None:
            newc.bias.copy_(c.bias.detach())
    set_submodule(model, chain.consumer, newc.train(c.training))


@torch.no_grad()
def _io(model, name, batches, want_input: bool, n_inputs: int = 1):
    """The input (or output) of module ``name`` over ``batches``."""
    got = []
    m = model.get_submodule(name)
    h = m.register_forward_hook(lambda mod, i, o: got.append((i[0] if want_input else o).detach()))
    try:
        with evaluating(model):
            for b in batches:
                run_batch(model, b, n_inputs)
    finally:
        h.remove()
    return got


def _patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``(positions, C k_h k_w)``: the input patches each output position of ``conv`` reads."""
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (B, C k k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def kept_channels(ratio: float, channels: int, multiple: int = 1) -> int:
    """``ceil(ratio C)`` rounded up to a multiple of ``multiple`` (at most ``C``, at least one). Vector units and
    int8 GEMM kernels work on blocks of channels: a count off the block wastes the rest of the last block."""
    k = max(1, math.ceil(ratio * channels - 1e-9))
    if multiple > 1:
        k = math.ceil(k / multiple) * multiple
    return min(k, channels)


def select_channels(model: nn.Module, chain: Chain, batches, ratio: float, n_inputs: int = 1,
                    multiple: int = 1) -> torch.Tensor:
    """The :func:`kept_channels` input channels of the consumer that contribute most (sorted indices)."""
    c = model.get_submodule(chain.consumer)
    xs = _io(model, chain.consumer, batches, True, n_inputs)
    rms = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in xs], 1).float().pow(2).mean(1).sqrt()
    score = c.weight.detach().float().transpose(0, 1).reshape(c.in_channels, -1).norm(dim=1) * rms
    k = kept_channels(ratio, c.in_channels, multiple)
    return torch.sort(torch.topk(score, k).indices).values


#: how far :func:`reconstruct` shrinks the channel correlations it measured towards none (Ledoit-Wolf style)
SHRINK = 0.3


@torch.no_grad()
def _input_moments(model, original, chain, batches, n_inputs):
    """Streaming first and second moments of the consumer's input patches in ``model`` (kept channels, ``x``) and in
    ``original`` (all channels, ``z``), position by position: ``(n, sum x, sum z, sum x x^T, sum x z^T)``."""
    c, co = model.get_submodule(chain.consumer), original.get_submodule(chain.consumer)
    got = {}
    hooks = [m.register_forward_pre_hook(lambda mod, i, key=key: got.__setitem__(key, i[0].detach()))
             for key, m in (("x", c), ("z", co))]
    acc = None
    try:
        with evaluating(model), evaluating(original):
            for b in batches:
                run_batch(model, b, n_inputs)
                run_batch(original, b, n_inputs)
                x, z = _patches(c, got["x"]).double(), _patches(co, got["z"]).double()
                part = (len(x), x.sum(0), z.sum(0), x.T @ x, x.T @ z)
                acc = part if acc is None else tuple(a + p for a, p in zip(acc, part))
    finally:
        for h in hooks:
            h.remove()
    return acc


@torch.no_grad()
def reconstruct(model: nn.Module, original: nn.Module, chain: Chain, batches, keep: torch.Tensor,
                shrink: float = SHRINK, n_inputs: int = 1) -> None:
    """Refit the (pruned) consumer's weights and bias so that, from its kept input channels *in the model as pruned
    so far* (``x``), it reproduces the original consumer's output ``W z + b`` (``z`` its full input in ``original``)
    on every position of ``batches``: ``W' = W C_zx S_x^-1``, ``b' = W mean(z) + b - W' mean(x)`` with ``S_x`` the
    covariance of ``x`` and ``C_zx`` the cross-covariance.

    Both are shrunk by ``shrink`` towards their channel-by-channel diagonals (each kept channel related only to
    itself): least squares on all positions fits the calibration images' channel correlations exactly (29 dB on
    them for MobileNetV2 with 15% of the hidden channels removed) and carries poorly to other images (2.4 dB);
    shrinking by 0.3 measured 5.3 / 5.1 dB on held-out photos of two splits where the plain fit scored 4.4 / 4.3
    dB (``benchmarks/results/compression.md``)."""
    c, co = model.get_submodule(chain.consumer), original.get_submodule(chain.consumer)
    n, sx, sz, xx, xz = _input_moments(model, original, chain, batches, n_inputs)
    mx, mz = sx / n, sz / n
    cov_x = xx / n - mx[:, None] * mx[None]
    cov_xz = xz / n - mx[:, None] * mz[None]
    kk = c.kernel_size[0] * c.kernel_size[1]  # patch features are channel-major: channel j at j*kk .. j*kk+kk-1
    rows = torch.arange(len(keep) * kk, device=cov_x.device)
    cols = (keep.to(cov_x.device)[:, None] * kk + torch.arange(kk, device=cov_x.device)[None]).reshape(-1)
    diag_xz = torch.zeros_like(cov_xz)
    diag_xz[rows, cols] = cov_xz[rows, cols]
    s = (1 - shrink) * cov_x + shrink * torch.diag(cov_x.diagonal())
    s = s + 1e-6 * s.diagonal().mean().clamp_min(1e-30) * torch.eye(len(s), dtype=s.dtype, device=s.device)
    w = co.weight.detach().double().reshape(co.out_channels, -1)
    b = co.bias.detach().double() if co.bias is not None else torch.zeros(co.out_channels, dtype=w.dtype, device=w.device)
    new_w = torch.linalg.solve(s, ((1 - shrink) * cov_xz + shrink * diag_xz) @ w.T).T
    new_b = w @ mz + b - new_w @ mx
    c.weight.copy_(new_w.reshape(c.weight.shape).to(c.weight.dtype))
    if c.bias is None:  # the refit needs a bias: the removed channels' mean contribution lands there
        c.bias = nn.Parameter(new_b.to(c.weight.dtype))
    else:
        c.bias.copy_(new_b.to(c.bias.dtype))


def prune_chain(model: nn.Module, original: nn.Module, chain: Chain, ratio: float, batches, n_inputs: int = 1,
                multiple: int = 1, shrink: float = SHRINK) -> torch.Tensor:
    """Select, prune and reconstruct one chain of ``model`` in place; returns the kept channels. ``n_inputs``:
    how many leading items of a tuple batch the model takes; ``multiple``: keep a multiple of this many;
    ``shrink``: see :func:`reconstruct`."""
    keep = select_channels(model, chain, batches, ratio, n_inputs, multiple)
    if len(keep) < chain.channels:
        apply_pruning(model, chain, keep)
        reconstruct(model, original, chain, batches, keep, shrink, n_inputs)
    return keep
