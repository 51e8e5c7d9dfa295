"""``edgequant.quantize`` for models that capture only region by region (detectors).

A detector's pre- and post-processing (image batching, anchors, box decoding, NMS) is data-dependent code no tracer
captures, so a whole-model :class:`~edgequant.sim.QuantSim` falls back to leaf modules: no fused kernels, no export.
:func:`quantize_regions` runs the float model on the calibration batches once, recording what each region (the largest
submodules that capture in graph mode, :class:`~edgequant.sim.RegionSim`) receives, then runs the whole one-call
pipeline (:func:`~edgequant.ptq.quantize`: BN folding, equalization, calibration, bias correction, AdaRound, scoring
on held-out batches) on each region with its own recorded inputs as data, and assembles the regions' sims into one
``RegionSim`` that :func:`edgequant.export_onnx` writes region by region.

Each region is scored against its own float outputs (SQNR over all its output tensors), not the model's final
detections: a region is a network with a fixed input, the code between regions is unchanged float code.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import io
import logging
import time
import warnings
from typing import Iterable, Optional

import torch
from torch import nn

from ..batches import as_args, evaluating, iterate
from ..config.spec import QuantConfig
from ..errors import DataError, GraphCaptureError
from ..graph.capture import capture
from ..graph.patterns import set_submodule
from ..sim.regions import RegionSim, find_regions, record_calls


def region_names(model: nn.Module, call: tuple, config, regions) -> list[str]:
    """The regions to quantize: ``regions`` itself (names of submodules), or those :class:`RegionSim` finds on the model
    called with ``call = (args, kwargs)`` when ``regions == "auto"`` (none when no submodule captures in graph mode)."""
    if regions != "auto":
        names = [regions] if isinstance(regions, str) else list(regions)
        unknown = [n for n in names if n not in dict(model.named_modules())]
        if unknown:
            raise ValueError(f"regions {unknown} are not submodules of the model")
        return names
    with evaluating(model):
        return sorted(find_regions(model, *call, QuantConfig.coerce(config), {}))


def call_of(batch, example_inputs=None) -> tuple[tuple, dict]:
    """``(args, kwargs)`` the model is called with on ``batch``, as every pass calls it (:func:`~edgequant.batches.run_batch`:
    a dict as keyword inputs, the first items of a tuple as positional inputs -- as many as ``example_inputs`` holds, one
    by default, so ``(images, labels)`` and a detector's ``([image, ...],)`` both work -- else the batch itself)."""
    n = len(as_args(example_inputs)[0]) if example_inputs is not None else 1
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch[: max(n, 1)]), {}
    return (batch,), {}


def _example_call(data, example_inputs) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the example call: ``example_inputs`` as ``QuantSim`` reads them, else the first batch."""
    return as_args(example_inputs) if example_inputs is not None else call_of(next(iter(data)))


def _as_batch(m: nn.Module, call) -> object:
    """One recorded call of region ``m`` as a batch the pipeline can feed back: the tensor itself for a single tensor
    input, else a dict of its forward's arguments by name (a tuple would read as ``(inputs, labels)``)."""
    a, kw = call
    if not kw and len(a) == 1 and torch.is_tensor(a[0]):
        return a[0]
    bound = inspect.signature(m.forward).bind(*a, **kw)
    out = {}
    for name, v in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL and v:
            raise DataError(f"region {type(m).__name__} was called with extra positional inputs (*{name}), which "
                            "cannot be fed back by name; pass regions= with its submodules instead")
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(v)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            out[name] = v
    return out


def record_region_inputs(model: nn.Module, data: Iterable, names: list[str], progress: bool = True,
                         example_inputs=None) -> dict[str, list]:
    """``{region: [batch, ...]}``: what each region receives while the float model runs every batch of ``data``
    (called as :func:`call_of` says)."""
    seen: dict[str, list] = {n: [] for n in names}
    with torch.no_grad(), evaluating(model):
        for _, batch in iterate(data, desc="recording region inputs", progress=progress):
            a, kw = call_of(batch, example_inputs)
            for n, calls in record_calls(model, a, kw, set(names)).items():
                seen[n].extend(_as_batch(model.get_submodule(n), c) for c in calls)
    missing = [n for n in names if not seen[n]]
    if missing:
        raise DataError(f"regions {missing} were not called on the calibration data")
    return seen


def quantize_regions(model: nn.Module, calib_data, recipe="w8a8", ptq="auto", *, regions="auto",
                     example_inputs=None, num_batches: Optional[int] = None, progress: bool = True, **kwargs):
    """:func:`~edgequant.ptq.quantize` region by region (see the module docstring); ``kwargs`` go to each region's
    ``quantize`` call (``holdout_batches``, ``adaround_iterations``, ...). Returns a
    :class:`~edgequant.ptq.QuantizeResult` whose ``sim`` is a :class:`~edgequant.sim.RegionSim`, ``encodings`` a dict
    ``{region: (activations, params)}``, ``model`` the float model with each region's float counterpart, and
    ``report`` every region's stages, named ``"region: stage"``."""
    from .pipeline import QuantizeReport, QuantizeResult, quantize

    if calib_data is None:
        raise ValueError("quantizing region by region needs calibration data (each region is calibrated on what it "
                         "receives from the model)")
    t0 = time.perf_counter()
    batches = list(calib_data) if num_batches is None else [b for _, b in zip(range(num_batches), calib_data)]
    if not batches:
        raise DataError("calib_data yielded no batches")
    call = _example_call(batches, example_inputs)
    names = region_names(model, call, recipe, regions)
    seen = record_region_inputs(model, batches, names, progress, example_inputs)
    results = {}
    for n in names:
        results[n] = quantize(model.get_submodule(n), seen[n], recipe, ptq, example_inputs=seen[n][0],
                              progress=progress, regions=None, **kwargs)
    sim = RegionSim.from_sims(model, {n: r.sim for n, r in results.items()})
    float_model = copy.deepcopy(model)
    for n, r in results.items():
        set_submodule(float_model, n, r.model)
    first = next(iter(results.values())).report
    report = QuantizeReport(first.recipe, f"per region: {first.score_name} (its output tensors)", None)
    for n, r in results.items():
        report.stages += [dataclasses.replace(s, name=f"{n}: {s.name}") for s in r.report.stages]
    report.refit = "\n".join(f"{n}: {r.report.refit}" for n, r in results.items() if r.report.refit)
    report.seconds = time.perf_counter() - t0
    return QuantizeResult(sim, {n: r.encodings for n, r in results.items()}, report, float_model)


def captures(model: nn.Module, data, example_inputs) -> bool:
    """Whether ``model`` captures as one graph on its example (the first batch of ``data`` by default, called as
    :func:`call_of` says)."""
    args, kwargs = _example_call(data, example_inputs)
    before = logging.root.manager.disable
    logging.disable(logging.CRITICAL)  # torch.export logs (and prints) the whole graph it could not capture
    try:
        with torch.no_grad(), evaluating(model), warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            capture(model, args, kwargs)
        return True
    except GraphCaptureError:
        return False
    finally:
        logging.disable(before)


def by_regions(model: nn.Module, data, config, ptq, regions, example_inputs, eval_fn, opts: dict):
    """:func:`quantize_regions` when ``regions`` names submodules, or is ``"auto"`` and the model does not capture as
    one graph while some submodules do; None otherwise (the caller quantizes the whole model)."""
    if data is None:  # data-free: the whole model (each region would need the inputs it receives)
        if regions == "auto":
            return None
        raise ValueError("quantizing region by region needs calibration data (each region is calibrated on what it "
                         "receives from the model); pass regions=None for data-free quantization of the whole model")
    if regions == "auto" and captures(model, data, example_inputs):
        return None
    call = _example_call(data, example_inputs)
    names = region_names(model, call, config, regions)
    if not names:  # no submodule captures either: the whole model in leaf mode
        return None
    if eval_fn is not None:
        raise ValueError(f"the model is quantized region by region ({', '.join(names)}): each region is scored on its "
                         "own outputs, so eval_fn (which scores the whole model) cannot choose its stages; pass "
                         "eval_fn=None (and evaluate result.sim yourself), or regions=None")
    return quantize_regions(model, data, config, ptq, regions=names, example_inputs=example_inputs, **opts)
