"""Per-layer compression ratios for a whole-model target, and the one-call :func:`compress`.

1. **Costs**: one forward pass with hooks records every candidate layer's input and output shapes, so the
   MACs of the layer and of each factorization are exact (:func:`layer_macs`, :func:`factored_macs`).
2. **Sensitivity curves**: each candidate layer alone is factorized at each candidate ratio and the model is
   scored (output SQNR against the float model on a few batches, or the user's ``eval_fn``): a curve per layer.
3. **Solver**: one ratio per layer (1.0 = untouched) so that the model keeps at most ``target`` of its MACs
   (or parameters):

   * ``"knapsack"`` (default): exact multiple-choice knapsack on the curves; with SQNR scores the predicted
     loss adds the layers' noise powers ``10^(-SQNR/10)`` (they add up where dB do not), with ``eval_fn`` the
     drops;
   * ``"greedy"``: AIMET's greedy selection -- one accuracy threshold for every layer, each layer at its
     smallest ratio that keeps the threshold, the threshold searched (bisection) for the highest one that
     meets the target.

4. The chosen ratios are applied to a copy of the model and it is scored for real; ``manual={layer:
   ratio}`` skips steps 2-3.

The result is a plain ``nn.Module`` (factored layers are ``nn.Sequential`` of two torch layers, same names
for everything else) that QuantSim, PTQ, QAT and the export take like any other.
"""
from __future__ import annotations

import copy
import inspect
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..batches import evaluating, run_batch, to_device
from ..graph.patterns import set_submodule
from ..metrics import sqnr_db
from ..solvers import multiple_choice_knapsack
from .prune import SHRINK, kept_channels, prunable_chains, prune_chain
from .svd import factorize, is_factorable, layer_input, rank_for_ratio, svd_rank_limit

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class LayerChoice:
    name: str
    kind: str
    ratio: float
    rank: Optional[int]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int


@dataclass
class CompressResult:
    """``model``: the compressed float model; ``layers``: the choice per candidate layer; ``curves``:
    ``{layer: [(ratio, score)]}``; ``score``: the compressed model's score (SQNR dB or ``eval_fn``)."""
    model: nn.Module
    layers: list[LayerChoice] = field(default_factory=list)
    curves: dict = field(default_factory=dict)
    score: float = float("nan")
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "model"}

    def __str__(self) -> str:
        n = sum(c.ratio < 1 for c in self.layers)
        return (f"compressed {n} of {len(self.layers)} layers: MACs {self.macs_after / 1e6:.1f} M of {self.macs_before / 1e6:.1f} M "
                f"({self.macs_after / max(self.macs_before, 1):.2f}), parameters {self.params_after / 1e6:.2f} M of "
                f"{self.params_before / 1e6:.2f} M; score {self.score:.2f}; {self.seconds:.1f} s")


@torch.no_grad()
def layer_shapes(model: nn.Module, example, n_inputs: int = 1) -> dict[str, tuple]:
    """``{name: (input shape, output shape)}`` of every Linear / Conv2d for one forward pass on ``example`` (a
    batch: ``n_inputs`` leading items of a tuple are the model's inputs)."""
    shapes = {}

    def record(name):
        def hook(mod, inputs, output):  # returns None: the output stays as it is
            shapes.setdefault(name, (tuple(inputs[0].shape), tuple(output.shape)))
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with evaluating(model):
            run_batch(model, example, n_inputs)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def layer_macs(m: nn.Module, shapes: tuple) -> int:
    """MACs of ``m`` for one sample with its recorded (input, output) shapes."""
    _, out = shapes
    per_sample = int(torch.tensor(out[1:]).prod()) if len(out) > 1 else 1
    if isinstance(m, nn.Linear):
        return per_sample * m.in_features
    return per_sample * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]


def model_macs(model: nn.Module, example, n_inputs: int = 1) -> int:
    """MACs of one sample through every Linear / Conv2d ``model`` runs on ``example``."""
    return sum(layer_macs(model.get_submodule(n), s) for n, s in layer_shapes(model, example, n_inputs).items())


def factored_macs(m: nn.Module, rank: int, shapes: tuple) -> int:
    """MACs of ``m``'s factorization at ``rank`` (exact from the recorded shapes)."""
    inp, out = shapes
    if isinstance(m, nn.Linear):
        rows = int(torch.tensor(out[1:-1]).prod()) if len(out) > 2 else 1
        return rows * rank * (m.in_features + m.out_features)
    _, _, h_out, w_out = out
    kh, kw = m.kernel_size
    if (kh, kw) == (1, 1):
        return h_out * w_out * rank * (m.in_channels + m.out_channels)
    w_in = inp[3] if len(inp) == 4 else inp[-1]
    return h_out * w_in * rank * m.in_channels * kh + h_out * w_out * m.out_channels * rank * kw


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _scorer(reference: nn.Module, batches, eval_fn, n_inputs: int = 1):
    """``score(model)``: ``eval_fn(model)``, or the SQNR (dB) of its outputs on ``batches`` against ``reference``'s
    (taken once, now)."""
    def outputs(m):
        with torch.no_grad(), evaluating(m):
            return torch.cat([run_batch(m, b, n_inputs).float().flatten(1) for b in batches])
    if eval_fn is not None:
        return lambda m: float(eval_fn(m))
    ref = outputs(reference)
    return lambda m: sqnr_db(ref, outputs(m))


@torch.no_grad()
def input_grams(model: nn.Module, names, batches, n_inputs: int = 1) -> dict:
    """``{name: E[x x^T]}`` over the input vectors of each Linear / 1x1 conv ``names`` on ``batches`` (float64)."""
    sums = {}

    def record(name):
        def hook(mod, inputs):
            x = layer_input(mod, inputs[0].detach()).double()
            g, n = sums.get(name, (0, 0))
            sums[name] = (g + x.T @ x, n + len(x))
        return hook

    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_pre_hook(record(n)) for n in names]
    try:
        with evaluating(model):
            for b in batches:
                run_batch(model, b, n_inputs)
    finally:
        for h in hooks:
            h.remove()
    return {n: g / max(k, 1) for n, (g, k) in sums.items()}


class _Svd:
    """Candidates, costs and trials of low-rank factorization (see :mod:`edgequant.compress.svd`)."""

    def __init__(self, work, example, batches, what, layers, min_macs, multiple, n_inputs, data_aware=True):
        self.work, self.what, self.multiple = work, what, multiple
        self.shapes = layer_shapes(work, example, n_inputs)
        mods = dict(work.named_modules())
        self.mods = {n: mods[n] for n in self.shapes}
        self.macs = {n: layer_macs(m, self.shapes[n]) for n, m in self.mods.items()}
        self.total_macs = sum(self.macs.values())
        if layers is None:
            layers = [n for n, m in self.mods.items() if is_factorable(m) and svd_rank_limit(m) > 1
                      and self.macs[n] >= min_macs * self.total_macs]
        unknown = [n for n in layers if n not in self.mods or not is_factorable(self.mods[n])]
        if unknown:
            raise ValueError(f"not factorable layers (plain Linear / ungrouped Conv2d run by the model): {unknown[:5]}")
        self.full = {n: (self.macs[n] if what == "macs" else _params(self.mods[n])) for n in layers}
        weight_svd_layers = [n for n in layers if isinstance(self.mods[n], nn.Linear) or self.mods[n].kernel_size == (1, 1)]
        self.grams = input_grams(work, weight_svd_layers, batches, n_inputs) if data_aware else {}

    def _factor(self, n, r):
        return factorize(self.mods[n], self._rank(n, r), self.multiple, self.grams.get(n))

    def _rank(self, n, r):
        return rank_for_ratio(self.mods[n], r, self.multiple)

    def after(self, n, r):
        return _cost_after(self.mods[n], self._rank(n, r), self.shapes[n], self.what)

    def trial(self, n, r, score):
        m = self.mods[n]
        set_submodule(self.work, n, self._factor(n, r))
        try:
            return score(self.work)
        finally:
            set_submodule(self.work, n, m)

    def apply(self, choice):
        for n in self.full:  # from the original layers each time (apply may be called again with another choice)
            r = choice.get(n, 1.0)
            set_submodule(self.work, n, self._factor(n, r) if r < 1 else self.mods[n])
        return self.work

    def report(self, choice):
        out = []
        for n in self.full:
            m, r = self.mods[n], choice.get(n, 1.0)
            rank = self._rank(n, r) if r < 1 else None
            after = factored_macs(m, rank, self.shapes[n]) if rank else self.macs[n]
            out.append(LayerChoice(n, type(m).__name__, r, rank, self.macs[n], after, _params(m),
                                   _cost_after(m, rank, self.shapes[n], "params") if rank else _params(m)))
        return out


class _Prune:
    """Candidates (chains, by consumer), costs and trials of channel pruning (see :mod:`edgequant.compress.prune`)."""

    def __init__(self, work, example, batches, what, layers, min_macs, multiple, n_inputs, shrink):
        self.work, self.batches, self.n_inputs, self.multiple, self.shrink = work, batches, n_inputs, multiple, shrink
        shapes = layer_shapes(work, example, n_inputs)
        mods = dict(work.named_modules())
        macs = {n: layer_macs(mods[n], shapes[n]) for n in shapes}
        self.total_macs = sum(macs.values())
        chains = prunable_chains(work, example if isinstance(example, tuple) else (example,))
        unknown = [n for n in (layers or []) if n not in chains]
        if unknown:
            raise ValueError(f"no prunable chain ends at {unknown[:5]}; chains end at {list(chains)[:5]}")
        self.chains = {n: c for n, c in chains.items() if layers is None or n in layers}
        members = {n: [c.producer, c.consumer] + [t for t in c.through if t in shapes] for n, c in self.chains.items()}
        self.full = {n: sum((macs[m] if what == "macs" else _params(mods[m])) for m in ms) for n, ms in members.items()}

    def kept(self, n, r):
        return kept_channels(r, self.chains[n].channels, self.multiple)

    def after(self, n, r):
        return self.full[n] * self.kept(n, r) / self.chains[n].channels

    def trial(self, n, r, score):
        m = copy.deepcopy(self.work)
        prune_chain(m, self.work, self.chains[n], r, self.batches, self.n_inputs, self.multiple, self.shrink)
        return score(m)

    def apply(self, choice):
        pruned = copy.deepcopy(self.work)
        for n, c in self.chains.items():  # graph order: each reconstruction absorbs the earlier prunings
            if choice.get(n, 1.0) < 1:
                prune_chain(pruned, self.work, c, choice[n], self.batches, self.n_inputs, self.multiple, self.shrink)
        return pruned

    def report(self, choice):
        return [LayerChoice(n, "channels", choice.get(n, 1.0), self.kept(n, choice.get(n, 1.0)), int(self.full[n]),
                            int(self.after(n, choice.get(n, 1.0))), 0, 0) for n in self.chains]


def _curves(names, ratios, trial, progress) -> dict:
    """``{name: [(ratio, score of the model with only that change)]}``; ``trial(name, ratio) -> score``."""
    return {n: [(r, trial(n, r)) for r in ratios]
            for n in tqdm(names, desc="compression: sensitivity", unit="layer", disable=not progress)}


def _n_inputs(model: nn.Module, batch) -> int:
    """How many leading items of a tuple batch are the model's inputs (its positional parameters; the rest,
    labels for instance, are not); 1 for a tensor."""
    if not isinstance(batch, (tuple, list)):
        return 1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = [p for p in inspect.signature(model.forward).parameters.values() if p.kind in kinds]
    return max(1, min(len(batch), len(params)))


def _loss(score: float, base: float, sqnr: bool) -> float:
    return 10 ** (-score / 10) if sqnr else max(base - score, 0.0)


def _solve(curves, full: dict, after: Callable, need: float, solver: str, base: float, sqnr: bool) -> dict:
    """One ratio per candidate (1.0: untouched) saving at least ``need`` (``full[n] - after(n, r)`` each)."""
    names = list(curves)
    options = []
    for n in names:
        opts = [(0.0, 0.0, 1.0)]
        for r, s in curves[n]:
            cost = after(n, r)
            if cost < full[n]:
                opts.append((_loss(s, base, sqnr), full[n] - cost, r))
        options.append(opts)
    if solver == "greedy":
        return _greedy(names, curves, options, need, base)
    pick = multiple_choice_knapsack([[(c, g) for c, g, _ in o] for o in options], need)
    if pick is None:
        raise ValueError("the target cannot be met with these layers at the candidate ratios; "
                         "raise the target or add smaller ratios")
    return {n: options[i][j][2] for i, (n, j) in enumerate(zip(names, pick))}


def _greedy(names, curves, options, need, base) -> dict:
    """AIMET's selection: one score threshold, each layer at its smallest ratio scoring at least that."""
    def at(threshold):
        choice, saved = {}, 0.0
        for n, opts in zip(names, options):
            ok = [o for o, (r, s) in zip(opts[1:], curves[n]) if s >= threshold]
            best = max(ok, key=lambda o: o[1]) if ok else opts[0]
            choice[n], saved = best[2], saved + best[1]
        return choice, saved
    scores = sorted({s for n in names for _, s in curves[n]}, reverse=True)
    for t in scores:  # highest threshold first: the first that meets the target (an exact scan of the bisection)
        choice, saved = at(t)
        if saved >= need:
            return choice
    raise ValueError("the target cannot be met by factorizing these layers at the candidate ratios")


def _cost_after(m, rank, shapes, kind) -> int:
    if kind == "params":
        if isinstance(m, nn.Linear) or m.kernel_size == (1, 1):
            return rank * (m.weight.shape[0] + m.weight.shape[1]) + (m.weight.shape[0] if m.bias is not None else 0)
        cout, cin, kh, kw = m.weight.shape
        return rank * (cin * kh + cout * kw) + (cout if m.bias is not None else 0)
    return factored_macs(m, rank, shapes)


def compress(model: nn.Module, data, target: float = 0.7, *, method: str = "svd", what: str = "macs",
             eval_fn: Optional[Callable] = None, ratios=RATIOS, layers: Optional[list[str]] = None,
             manual: Optional[dict] = None, solver: str = "knapsack", multiple: int = 1, eval_batches: int = 2,
             min_macs: float = 0.002, of: str = "model", curves: Optional[dict] = None, data_aware: bool = True,
             shrink: float = SHRINK, progress: bool = True) -> CompressResult:
    """Compress ``model`` (not modified) to keep ``target`` of its MACs (``what="params"``: of its parameters);
    see the module docstring.

    Args:
        data: batches; the first ``eval_batches`` score the candidates (with ``eval_fn=None``); the first 8 give
            the layer inputs that channel pruning reconstructs from and data-aware SVD weighs by.
        method: ``"svd"`` (weight SVD of Linear / 1x1 convs, spatial SVD of larger convs) or ``"prune"``
            (channel pruning with reconstruction, :mod:`edgequant.compress.prune`).
        eval_fn: ``eval_fn(model) -> float`` (higher is better) instead of the output SQNR against the original.
        ratios: the candidate ratios of a layer's MACs (SVD) or channels (pruning) to keep.
        layers: the candidates: layer names (SVD; default every plain Linear and ungrouped Conv2d holding at
            least ``min_macs`` of the model's MACs) or consumer conv names of chains (pruning; default all).
        manual: ``{layer: ratio}`` to apply as given (no search).
        solver: ``"knapsack"`` (exact, default) or ``"greedy"`` (AIMET's).
        multiple: round ranks (SVD) and kept channels (pruning) up to a multiple of this (what the target
            hardware prefers: 8 or 16 for int8 GEMM and vector kernels).
        of: the target is a fraction of the whole model's MACs / parameters (``"model"``) or of the candidate
            layers' (``"layers"``: e.g. a transformer's Linear layers without its embeddings).
        curves: the ``curves`` of an earlier result on the same model, data and method (the sensitivity step is
            then skipped: several targets cost one search).
        data_aware: weight SVD (Linear, 1x1 convs) keeps what the layer's *outputs* need on ``data``'s inputs
            (:func:`edgequant.compress.svd.weight_svd` with ``gram``) rather than the largest weight directions.
        shrink: channel pruning's reconstruction shrinks the measured channel correlations by this much
            (:func:`edgequant.compress.prune.reconstruct`).
    """
    for arg, value, allowed in (("method", method, ("svd", "prune")), ("what", what, ("macs", "params")),
                                ("solver", solver, ("knapsack", "greedy")), ("of", of, ("model", "layers"))):
        if value not in allowed:
            raise ValueError(f"{arg} must be one of {allowed}, got {value!r}")
    if not 0 < target <= 1:
        raise ValueError(f"target must be a fraction in (0, 1], got {target}")
    t0 = time.perf_counter()
    work = copy.deepcopy(model).eval()
    batches = list(data)
    device = next((p.device for p in work.parameters()), torch.device("cpu"))
    scoring = [to_device(b, device) for b in batches[:eval_batches]]
    n_inputs = _n_inputs(work, batches[0])
    first = to_device(batches[0], device)
    example = tuple(t[:1] for t in first[:n_inputs]) if isinstance(first, (tuple, list)) else first[:1]
    sample = [to_device(b, device) for b in batches[:8]]  # what reconstruction / data-aware SVD measure inputs on
    if method == "svd":
        job = _Svd(work, example, sample, what, layers, min_macs, multiple, n_inputs, data_aware)
    else:
        job = _Prune(work, example, sample, what, layers, min_macs, multiple, n_inputs, shrink)
    total = sum(job.full.values()) if of == "layers" else (job.total_macs if what == "macs" else _params(work))
    score = _scorer(work, scoring, eval_fn, n_inputs)
    base = score(work) if eval_fn is not None else float("inf")
    res = CompressResult(work, macs_before=job.total_macs, params_before=_params(work))
    def measure(m):
        if what == "params" or of == "layers":
            return None
        return model_macs(m, example, n_inputs)

    if manual is not None:
        res.model = job.apply(dict(manual))
        res.layers = job.report(dict(manual))
    else:
        res.curves = curves or _curves(list(job.full), ratios, lambda n, r: job.trial(n, r, score), progress)
        need = total - target * total
        for _ in range(4):  # savings of chains sharing a layer overlap: tighten until the measured target holds
            choice = _solve(res.curves, job.full, job.after, need, solver, base, eval_fn is None)
            res.model, res.layers = job.apply(choice), job.report(choice)
            got = measure(res.model)
            if got is None or got <= target * total * (1 + 1e-9):
                break
            need += got - target * total
    res.macs_after = sum(layer_macs(res.model.get_submodule(n), s) for n, s in layer_shapes(res.model, example, n_inputs).items())
    res.params_after = _params(res.model)
    res.score = score(res.model)
    res.seconds = time.perf_counter() - t0
    return res
