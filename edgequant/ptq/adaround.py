r"""AdaRound: learn whether each weight rounds up or down (Nagel et al., ICML 2020).

For a layer with weight ``W``, scale ``s`` and zero point ``z`` (per channel), nearest rounding is one
choice among ``floor(W/s)`` and ``floor(W/s) + 1``. AdaRound picks per weight by minimizing the
layer's output error on real inputs,

.. math::
    \min_V \; \big\| f(\tilde W x_q + b) - f(W x + b) \big\|^2
          + \lambda \sum_{ij} \big(1 - |2h(V_{ij}) - 1|^\beta\big),\qquad
    \tilde W = s\,\big(\mathrm{clamp}(\lfloor W/s \rfloor + h(V) + z,\ q_{min}, q_{max}) - z\big)

with the rectified sigmoid ``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``
(``zeta = 1.1``, ``gamma = -0.1``), ``beta`` annealed from 20 to 2 after a warm start without the
regularizer, ``x_q`` the input the quantized model feeds the layer (asymmetric reconstruction, set
``asymmetric=False`` for the float input), ``x`` the float input, and ``f`` the activation fused
after the layer (ReLU/ReLU6/clamp) when there is one. At the end ``h`` is rounded to 0/1.

**Why it is fast and bounded in memory.** Layers are optimized one at a time on a fixed sample of
output positions: for a convolution, ``samples`` output pixels drawn across the calibration batches
and the input patches that produce them (gathered, never a full ``unfold``), so every iteration is
one ``(samples x K) @ (K x Cout)`` product, whatever the image size. The float targets for all layers
come from one float pass; each layer's quantized inputs come from one pass of the sim that stops at
that layer. The default schedule (800 iterations, Adam, learning rate 1e-2, warm start 20%) is a few
per cent of AIMET's 10,000-15,000 iterations. The regularizer weight is relative:
``lambda = reg_weight * (reconstruction error of nearest rounding) / (number of weights)``,
so one value works for layers of every size and scale.

The rounded weights are written into the sim's layer (exactly on the grid) and its weight quantizer is
frozen, so a later ``sim.calibrate`` keeps them. If the learned rounding reconstructs the layer's output
worse than nearest rounding on the cached sample, nearest rounding is kept (the report says where).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..batches import evaluating, iterate
from ..core.granularity import expand_param
from ..core.quant import fake_quantize
from ..errors import NotCalibratedError
from ..graph.patterns import following_activation
from ..nn.modules import QuantizedModuleMixin, float_class_of, own_forward
from ..nn.padded import conv_pads
from ..nn.quantizer import Quantizer
from ..nn.rnn import QuantizedRecurrentMixin

ZETA, GAMMA = 1.1, -0.1


class _Stop(Exception):
    pass


@dataclass
class LayerResult:
    mse_nearest: float
    mse_adaround: float
    kept_nearest: bool
    changed: float  # fraction of weights rounded the other way than nearest
    seconds: float


@dataclass
class AdaRoundReport:
    layers: dict[str, LayerResult] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    iterations: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        n = len(self.layers)
        better = sum(r.mse_adaround < r.mse_nearest for r in self.layers.values())
        ratio = [r.mse_adaround / r.mse_nearest for r in self.layers.values() if r.mse_nearest > 0]
        med = sorted(ratio)[len(ratio) // 2] if ratio else float("nan")
        return (f"AdaRound: {n} layer(s), {self.iterations} iterations each, {self.seconds:.1f} s; better than nearest "
                f"in {better}; median output error ratio to nearest {med:.3f}"
                + (f"; skipped {len(self.skipped)}" if self.skipped else ""))


def _layers(sim) -> dict[str, nn.Module]:
    out = {}
    for name, m in sim.model.named_modules():
        if isinstance(m, QuantizedModuleMixin) and "weight" in m.param_quantizers:
            out[name] = m
    return out


def _following_activation(sim, name: str) -> Optional[Callable]:
    """The ReLU-like op the layer's output goes through before its output quantizer, if any."""
    if sim.capture_mode != "graph":
        return None
    return following_activation(sim.model, name, dict(sim.model.named_modules()))


class _Sampler:
    """Fixed random output positions per (layer, batch) and the input rows that produce them."""

    def __init__(self, module: nn.Module, samples: int, n_batches: int, seed: int):
        self.m = module
        self.per_batch = max(1, -(-samples // n_batches))
        self.seed = seed
        self.positions: dict[int, tuple] = {}

    def _pick(self, b: int, out_shape, device):
        if b not in self.positions:
            g = torch.Generator().manual_seed(self.seed * 100003 + b)
            if isinstance(self.m, nn.Linear):
                rows = int(torch.tensor(out_shape[:-1]).prod())
                idx = torch.randperm(rows, generator=g)[: self.per_batch]
                self.positions[b] = (idx.to(device),)
            else:
                n, _, h, w = out_shape
                total = n * h * w
                idx = torch.randperm(total, generator=g)[: self.per_batch]
                self.positions[b] = ((idx // (h * w)).to(device), ((idx // w) % h).to(device), (idx % w).to(device))
        return self.positions[b]

    def outputs(self, b: int, out: torch.Tensor) -> torch.Tensor:
        """(P, Cout) rows of the layer output at the batch's positions."""
        if isinstance(self.m, nn.Linear):
            (idx,) = self._pick(b, out.shape, out.device)
            return out.reshape(-1, out.shape[-1])[idx]
        out4 = out if out.ndim == 4 else out.unsqueeze(2)
        n, oh, ow = self._pick(b, out4.shape, out.device)
        return out4[n, :, oh, ow]

    def inputs(self, b: int, x: torch.Tensor, out_shape) -> torch.Tensor:
        """(P, G, K) input patches for the batch's positions (K = Cin/groups * kernel size)."""
        m = self.m
        if isinstance(m, nn.Linear):
            (idx,) = self._pick(b, out_shape, x.device)
            return x.reshape(-1, x.shape[-1])[idx].unsqueeze(1)
        if x.ndim == 3:  # Conv1d as a 2-D conv of height 1
            x = x.unsqueeze(2)
            out_shape = (out_shape[0], out_shape[1], 1, out_shape[2])
        ks = _pair(m.kernel_size)
        st, dl = _pair(m.stride), _pair(m.dilation)
        pads = conv_pads(m)
        (top, bottom), (left, right) = pads if len(pads) == 2 else [(0, 0)] + pads  # Conv1d: height 1
        pad4 = (left, right, top, bottom)
        if m.padding_mode != "zeros":
            raise NotImplementedError(f"padding_mode={m.padding_mode!r}")
        n, oh, ow = self._pick(b, out_shape, x.device)
        xp = F.pad(x, pad4)
        rows = (oh * st[0])[:, None] + torch.arange(ks[0], device=x.device) * dl[0]  # (P, kh)
        cols = (ow * st[1])[:, None] + torch.arange(ks[1], device=x.device) * dl[1]  # (P, kw)
        patches = xp[n[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (P, kh, kw, Cin)
        patches = patches.permute(0, 3, 1, 2)  # (P, Cin, kh, kw)
        g = m.groups
        return patches.reshape(patches.shape[0], g, -1)  # (P, G, Cin/G * kh * kw)


def _pair(v):
    if isinstance(v, int):
        return (v, v)
    return tuple(v) if len(v) == 2 else (1, v[0])


def _forward_layer(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], groups: int) -> torch.Tensor:
    """x: (P, G, K), w: (Cout, K) -> (P, Cout)."""
    cout = w.shape[0]
    if groups == 1:
        out = x[:, 0] @ w.t()
    else:
        out = torch.einsum("pgk,gok->pgo", x, w.view(groups, cout // groups, -1)).reshape(x.shape[0], cout)
    return out if bias is None else out + bias


def _run(sim, batch, forward_fn):
    sim.run_batch(batch, forward_fn)


def adaround(sim, data, *, iterations: int = 800, samples: int = 4096, rows_per_step: int = 1024,
             reg_weight: float = 0.01, beta_range: tuple[float, float] = (20.0, 2.0), warm_start: float = 0.2,
             lr: float = 1e-2, asymmetric: bool = True, num_batches: Optional[int] = None,
             forward_fn: Optional[Callable] = None, layers: Optional[list[str]] = None, seed: int = 0,
             progress: bool = True) -> AdaRoundReport:
    """Learn the rounding of every quantized conv/linear weight of a calibrated sim (in place), and of the
    weights of quantized LSTM / GRU / RNN layers (each weight matrix against the float product it computes
    at every time step).

    Args:
        sim: a :class:`~edgequant.QuantSim` whose quantizers are calibrated (activation encodings
            are needed for the quantized inputs).
        data: calibration batches (a list, a DataLoader, ...); up to ``num_batches`` are kept in
            memory on the sim's device for the run.
        iterations: Adam steps per layer.
        samples: output positions sampled per layer (rows of the reconstruction problem).
        rows_per_step: rows per Adam step (all of them if fewer).
        reg_weight: weight of the rounding regularizer, relative (see the module docstring).
        beta_range: ``beta`` annealed from the first to the second value.
        warm_start: fraction of iterations without the regularizer.
        asymmetric: reconstruct from the quantized model's inputs (else from float inputs).
        layers: names of the layers to round (default: all quantized conv/linear and recurrent layers).

    Returns an :class:`AdaRoundReport` with each layer's output error for nearest and learned rounding.
    """
    t_start = time.perf_counter()
    batches = [b for _, b in iterate(data, num_batches=num_batches, device=sim.device, desc="AdaRound", progress=False)]
    all_layers = _layers(sim)
    recurrent = {n: m for n, m in sim.model.named_modules() if isinstance(m, QuantizedRecurrentMixin)}
    if layers is not None:
        unknown = sorted(set(layers) - set(all_layers) - set(recurrent))
        if unknown:
            raise ValueError(f"not quantized layers of this sim: {unknown}")
    report = AdaRoundReport(iterations=iterations)
    todo = {}
    for name, m in all_layers.items():
        if layers is not None and name not in layers:
            continue
        q = m.param_quantizers["weight"]
        if not isinstance(q, Quantizer):
            report.skipped[name] = "its weight quantizer is disabled"
        elif own_forward(m):
            report.skipped[name] = f"{type(m).__name__[len('Quantized'):]} computes in its own forward (its patches cannot be read from its attributes)"
        elif not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            report.skipped[name] = f"{float_class_of(type(m)).__name__} is not supported (Conv1d, Conv2d and Linear are)"
        elif not q.is_initialized:
            raise NotCalibratedError(f"{name}.weight has no encoding: call sim.calibrate(data) before adaround")
        elif isinstance(m, nn.Conv2d) and (isinstance(m.padding, str) or m.padding_mode != "zeros"):
            report.skipped[name] = "only zero padding with explicit sizes is supported"
        else:
            todo[name] = m
    samplers = {n: _Sampler(m, samples, len(batches), seed + i) for i, (n, m) in enumerate(todo.items())}
    with evaluating(sim):
        targets = _float_targets(sim, todo, samplers, batches, forward_fn)
        for name, m in tqdm(list(todo.items()), desc="AdaRound", unit="layer", disable=not progress):
            t0 = time.perf_counter()
            x = _layer_inputs(sim, name, m, samplers[name], batches, forward_fn, quantized=asymmetric)
            act = _following_activation(sim, name)
            report.layers[name] = _round_layer(m, x, targets[name], act, iterations, rows_per_step, reg_weight,
                                               beta_range, warm_start, lr, seed)
            report.layers[name].seconds = time.perf_counter() - t0
        hyper = (iterations, rows_per_step, reg_weight, beta_range, warm_start, lr, seed)
        for name, m in recurrent.items():
            if layers is None or name in layers:
                _round_recurrent(sim, name, m, batches, forward_fn, samples, asymmetric, hyper, report)
            del x
    report.seconds = time.perf_counter() - t_start
    return report


@torch.no_grad()
def _float_targets(sim, layers, samplers, batches, forward_fn) -> dict[str, torch.Tensor]:
    rows: dict[str, list] = {n: [] for n in layers}
    state = {"b": 0}

    def hook(name):
        def fn(mod, inp, out):
            rows[name].append(samplers[name].outputs(state["b"], out).float())
        return fn

    hooks = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        with sim.quantization_disabled():
            for b, batch in enumerate(batches):
                state["b"] = b
                _run(sim, batch, forward_fn)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


@torch.no_grad()
def _layer_inputs(sim, name, m, sampler, batches, forward_fn, quantized: bool) -> torch.Tensor:
    """The layer's input patches at the sampled positions, running the sim only up to this layer."""
    got = []
    state = {"b": 0}

    def hook(mod, inp, out):
        got.append(sampler.inputs(state["b"], inp[0], out.shape).float())
        raise _Stop

    h = m.register_forward_hook(hook)
    try:
        ctx = sim.quantization_disabled() if not quantized else contextlib.nullcontext()
        with ctx:
            for b, batch in enumerate(batches):
                state["b"] = b
                try:
                    _run(sim, batch, forward_fn)
                except _Stop:
                    pass
    finally:
        h.remove()
    return torch.cat(got)


def _h(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def _round_layer(m, x, target, act, iterations, rows_per_step, reg_weight, beta_range, warm_start, lr, seed) -> LayerResult:
    q: Quantizer = m.param_quantizers["weight"]
    w = m.weight.detach().float()
    g = q.spec.granularity
    s = expand_param(q.scale, w.shape, g).float().expand_as(w)
    if isinstance(m, nn.Conv1d):
        w, s = w.unsqueeze(2), s.unsqueeze(2)
    cout = w.shape[0]
    groups = getattr(m, "groups", 1)
    w_floor = torch.floor(w / s)
    rest = (w / s - w_floor).clamp(1e-4, 1 - 1e-4)
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).reshape(cout, -1).clone().requires_grad_(True)
    base = w_floor.reshape(cout, -1)
    bias = m.bias.detach().float() if m.bias is not None else None
    f = (lambda t: t) if act is None else act
    w_layer = m.weight.detach().float()

    def weight(hard_or_soft):  # (Cout, K): the one formula with learned rounding floor(w/s) + h
        h = hard_or_soft.reshape(w_layer.shape)
        return fake_quantize(w_layer, q.scale, q.zero_point, q.qmin, q.qmax, g, rounding=h).reshape(cout, -1)

    depthwise = groups > 1 and groups == cout
    if depthwise:  # (G, P, K) layout: one batched (P, K) @ (K, 1) per channel
        xg = x.permute(1, 0, 2).contiguous()
        rows_per_step = max(rows_per_step // 4, 1)  # K weights per channel: fewer rows suffice

    def recon(wq, rows=None):
        tt = target if rows is None else target[rows]
        if depthwise:
            xx = xg if rows is None else xg[:, rows]
            out = torch.bmm(xx, wq.view(groups, -1, 1)).squeeze(-1).t()
            out = out if bias is None else out + bias
        else:
            out = _forward_layer(x if rows is None else x[rows], wq, bias, groups)
        return (f(out) - f(tt)).pow(2).sum(1).mean()

    with torch.no_grad():
        nearest = torch.round(w / s).reshape(cout, -1) - base  # 0 or 1 (ties to even can give 0 or 1)
        mse_near = float(recon(weight(nearest)))
    lam = reg_weight * max(mse_near, 1e-12) / v.numel()
    opt = torch.optim.Adam([v], lr=lr)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    n_rows = x.shape[0]
    warm = int(warm_start * iterations)
    for it in range(iterations):
        rows = None if n_rows <= rows_per_step else torch.randint(0, n_rows, (rows_per_step,), generator=gen, device=x.device)
        h = _h(v)
        loss = recon(weight(h), rows)
        if it >= warm:
            frac = (it - warm) / max(iterations - warm, 1)
            beta = beta_range[1] + 0.5 * (beta_range[0] - beta_range[1]) * (1 + torch.cos(torch.tensor(frac * torch.pi)))
            loss = loss + lam * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        hard = (v >= 0).float()
        mse_ada = float(recon(weight(hard)))
        kept = mse_ada > mse_near
        choice = nearest if kept else hard
        new_w = weight(choice).reshape(m.weight.shape)
        m.weight.data.copy_(new_w.to(m.weight.dtype))
        q.freeze()
        changed = float((choice != nearest).float().mean())
    return LayerResult(mse_near, min(mse_ada, mse_near) if kept else mse_ada, kept, changed, 0.0)


class _WeightSite:
    """One weight matrix of a recurrent layer, shaped like a Linear for :func:`_round_layer`."""

    groups = 1

    def __init__(self, layer, weight: str, bias: Optional[str]):
        self.weight = getattr(layer, weight)  # the layer's Parameter: rounding writes into it
        self.param_quantizers = {"weight": layer.param_quantizers[weight]}
        self.bias = getattr(layer, bias) if bias is not None and layer.bias else None


@torch.no_grad()
def _recorded(sim, layer, batches, forward_fn, quantized: bool) -> dict[str, torch.Tensor]:
    """``{weight name: (rows, K)}``: what each weight of the recurrent ``layer`` multiplied, over the batches."""
    layer._record = {}
    try:
        with contextlib.nullcontext() if quantized else sim.quantization_disabled():
            for batch in batches:
                _run(sim, batch, forward_fn)
        return {w: torch.cat(rows).float() for w, rows in layer._record.items()}
    finally:
        layer._record = None


def _round_recurrent(sim, name, layer, batches, forward_fn, samples, asymmetric, hyper, report) -> None:
    """AdaRound of each quantized weight of a recurrent layer, in order (layer 0 first): the float targets
    come from one float pass; each weight's quantized inputs from a pass after the earlier ones were rounded."""
    floats = _recorded(sim, layer, batches, forward_fn, quantized=False)
    for wname in [w for w in layer._flat_weights_names if w in layer.param_quantizers]:
        q = layer.param_quantizers[wname]
        if not isinstance(q, Quantizer):
            report.skipped[f"{name}.{wname}"] = "its weight quantizer is disabled"
            continue
        t0 = time.perf_counter()
        bias = wname.replace("weight", "bias") if not wname.startswith("weight_hr") else None
        site = _WeightSite(layer, wname, bias)
        x_f = floats[wname]
        idx = torch.randperm(len(x_f), generator=torch.Generator().manual_seed(hyper[-1]))[:samples].to(x_f.device)
        target = F.linear(x_f[idx], site.weight.detach().float(), None if site.bias is None else site.bias.detach().float())
        x = _recorded(sim, layer, batches, forward_fn, quantized=True)[wname][idx] if asymmetric else x_f[idx]
        report.layers[f"{name}.{wname}"] = _round_layer(site, x.unsqueeze(1), target, None, *hyper)
        report.layers[f"{name}.{wname}"].seconds = time.perf_counter() - t0
