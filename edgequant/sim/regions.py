"""Quantization region by region, for models whose pre- and post-processing no tracer captures.

A detector's ``forward`` resizes its images into a batch, generates anchors, decodes boxes and runs
non-maximum suppression: data-dependent code that neither ``torch.fx`` nor ``torch.export`` captures, so a
:class:`~edgequant.sim.QuantSim` of the whole model falls back to leaf modules (no fused kernels, no
export). Its compute, though, sits in a few submodules that do capture: the backbone with its feature
pyramid and the heads. :class:`RegionSim` makes each of the largest such submodules a graph-mode
``QuantSim`` (a *region*) and leaves the code between them in float, as the model wrote it; each region
exports to its own ONNX file (:func:`edgequant.export_onnx` given a folder), which is how such models are
deployed: the network on the accelerator, the box decoding and NMS on the CPU.

Regions are found top-down: a submodule that ran on the example and holds a weighted layer is captured
whole if graph capture accepts it on the inputs it was called with (its first call's), else its children
are tried.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from typing import Iterable, Optional

import torch
from torch import nn

from ..batches import as_args, evaluating, iterate, map_tensors
from ..errors import DataError, GraphCaptureError
from ..graph.patterns import set_submodule
from ..nn.registry import lookup
from .quantsim import QuantSim


def record_calls(model: nn.Module, args: tuple, kwargs: dict, names: Optional[set] = None) -> dict[str, list]:
    """``{submodule name: [(args, kwargs), ...]}``, one entry per call during ``model(*args, **kwargs)`` (inputs
    detached and cloned); only the submodules in ``names`` when given."""
    calls: dict[str, list] = {}
    hooks = []
    for name, m in model.named_modules():
        if name and (names is None or name in names):
            def hook(mod, a, kw, name=name):
                calls.setdefault(name, []).append(map_tensors(lambda t: t.detach().clone(), (a, kw)))
            hooks.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad(), evaluating(model):
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return calls


def _has_weights(m: nn.Module) -> bool:
    return any(lookup(x) is not None for x in m.modules())


def _capture(m: nn.Module, call, config, sim_kwargs) -> Optional[QuantSim]:
    """A graph-mode sim of ``m`` on its recorded ``call``, or None when graph capture refuses it."""
    a, kw = call
    example = dict(kw) if kw and not a else (tuple(a) if not kw else None)
    if example is None:  # positional and keyword inputs together: only the positional ones are examples
        return None
    before = logging.root.manager.disable
    logging.disable(logging.CRITICAL)  # torch.export logs (and prints) every graph it cannot capture, whole
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return QuantSim(m, example, config, allow_fallback=False, **sim_kwargs)
    except (GraphCaptureError, DataError, ValueError, TypeError, RuntimeError, NotImplementedError):
        return None
    finally:
        logging.disable(before)


def find_regions(model: nn.Module, args: tuple, kwargs: dict, config, sim_kwargs: dict) -> dict[str, QuantSim]:
    """The largest submodules of ``model`` that capture in graph mode (see the module docstring), level by level:
    one forward per level records the inputs of that level's candidates only (a clone of every layer's input at
    once would hold a detector's whole activation memory)."""
    found: dict[str, QuantSim] = {}
    frontier = [name for name, child in model.named_children() if _has_weights(child)]
    while frontier:
        calls = record_calls(model, args, kwargs, set(frontier))
        deeper = []
        for name in frontier:
            if name not in calls:  # did not run on the example
                continue
            m = model.get_submodule(name)
            sim = _capture(m, calls[name][0], config, sim_kwargs)
            if sim is not None:
                found[name] = sim
            else:
                deeper += [f"{name}.{c}" for c, child in m.named_children() if _has_weights(child)]
        frontier = deeper
    return found


class RegionSim(nn.Module):
    """A model quantized region by region (see the module docstring).

    Args:
        model: the float model (not modified: the sim works on a copy).
        example_inputs: what the model is called with (a tensor, a tuple of positional inputs, a dict).
        config: the quantization config of every region (as for :class:`QuantSim`).
        regions: names of the submodules to quantize; default: found automatically.
        **sim_kwargs: passed to each region's ``QuantSim`` (``fold_bn=``, ``plan=`` ...).

    ``sim.regions`` maps each region's name to its graph-mode ``QuantSim``; ``sim.model`` is the copy of the
    model that calls them. Calibrate with :meth:`calibrate`, compare with :meth:`integer_exact` and
    :meth:`quantization_disabled` as for a ``QuantSim``, export with ``edgequant.export_onnx(sim, folder)``.

    >>> import torch, torchvision
    >>> det = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
    >>> sim = RegionSim(det, ([torch.rand(3, 320, 320)],))  # one positional input: a list of images  # doctest: +SKIP
    >>> sorted(sim.regions)  # doctest: +SKIP
    ['backbone', 'head']
    """

    def __init__(self, model: nn.Module, example_inputs, config="w8a8", *, regions: Optional[Iterable[str]] = None,
                 **sim_kwargs):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"RegionSim needs a torch.nn.Module, got {type(model).__name__}")
        args, kwargs = as_args(example_inputs)
        if regions is not None:
            names = set(regions)
            calls = record_calls(model, args, kwargs, names)
            missing = sorted(names - set(calls))
            if missing:
                raise ValueError(f"regions {missing} did not run on the example inputs; name submodules the model "
                                 f"calls ({', '.join(n for n, _ in list(model.named_modules())[1:6])}, ...)")
            found = {}
            for n in sorted(names):
                sim = _capture(model.get_submodule(n), calls[n][0], config, sim_kwargs)
                if sim is None:
                    raise GraphCaptureError(f"region {n!r} does not capture in graph mode; try its submodules")
                found[n] = sim
        else:
            found = find_regions(model, args, kwargs, config, sim_kwargs)
        if not found:
            raise GraphCaptureError("no submodule of the model captures in graph mode: use QuantSim (leaf mode)")
        self._assemble(model, found)

    def _assemble(self, model: nn.Module, sims: dict[str, QuantSim]) -> None:
        self.model = copy.deepcopy(model)
        for n, sim in sims.items():
            set_submodule(self.model, n, sim)
        self.model.train(model.training)

    @classmethod
    def from_sims(cls, model: nn.Module, sims: dict[str, QuantSim]) -> "RegionSim":
        """A RegionSim of ``model`` (copied, not modified) whose submodules named in ``sims`` are those graph-mode sims
        (built elsewhere, e.g. each by :func:`edgequant.quantize` on the region's recorded inputs)."""
        bad = [n for n, s in sims.items() if not isinstance(s, QuantSim) or s.capture_mode != "graph"]
        if bad or not sims:
            raise ValueError(f"regions must be graph-mode QuantSims; not: {bad or 'none given'}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._assemble(model, sims)
        return self

    @property
    def regions(self) -> dict[str, QuantSim]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, QuantSim)}

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def calibrate(self, data: Iterable, num_batches: Optional[int] = None, progress: bool = True) -> dict:
        """Calibrate every region on what it receives while the model runs ``data`` with its quantizers off
        (each batch: a model input, a tuple of positional inputs or a dict, as for ``QuantSim.calibrate``).
        Returns ``{region: CalibrationReport}``."""
        regions = self.regions
        seen: dict[str, list] = {n: [] for n in regions}
        with self.quantization_disabled():
            for _, batch in iterate(data, num_batches=num_batches, device=None, desc="recording", progress=progress):
                a, kw = as_args(batch)
                for n, c in record_calls(self.model, a, kw, set(regions)).items():
                    seen[n].extend(c)
        missing = [n for n in regions if not seen[n]]
        if missing:
            raise DataError(f"regions {missing} were not called on the calibration data")
        return {n: sim.calibrate(seen[n], forward_fn=lambda s, call: s(*call[0], **call[1]), progress=False)
                for n, sim in regions.items()}

    @contextlib.contextmanager
    def _each(self, method: str, *args):
        with contextlib.ExitStack() as stack:
            for sim in self.regions.values():
                stack.enter_context(getattr(sim, method)(*args))
            yield self

    def quantization_disabled(self):
        """Context manager: every region computes in float (the float model)."""
        return self._each("quantization_disabled")

    def integer_exact(self, requant: str = "float32", tables: bool = False, float64: bool = False):
        """Context manager: every region computes what its deployed integer kernels compute
        (:meth:`QuantSim.integer_exact`); the code between regions runs as it always does."""
        return self._each("integer_exact", requant, tables, float64)

    def summary(self) -> str:
        lines = [f"RegionSim: {len(self.regions)} region(s) in graph mode; the code between them runs in float"]
        for n, sim in self.regions.items():
            lines.append(f"  {n}: {type(sim.model).__name__}, {len(sim.quantizers())} quantizers")
        return "\n".join(lines)
