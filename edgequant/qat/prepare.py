"""Turn a calibrated sim into one whose grids train with the weights (LSQ / LSQ+), or leave the grids
fixed: the two QAT modes of :func:`prepare_qat`."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from ..config.spec import LEARN_MODES
from ..errors import NotCalibratedError
from ..nn.quantizer import LearnedQuantizer, Quantizer

_ROLES = {"weight": ("weight",), "activation": ("input", "activation", "output")}


def prepare_qat(sim, learn: Optional[str] = "scale_offset", weights: bool = True, activations: bool = True) -> list[str]:
    """Make the grids of ``sim`` trainable, in place, starting from their current encodings.

    Args:
        sim: a calibrated :class:`~edgequant.sim.QuantSim` (any :func:`edgequant.quantize` result: its
            folded batch norms, equalized and bias-corrected weights, AdaRound's rounded weights and
            frozen weight encodings are the starting point, unchanged).
        learn: ``"scale_offset"`` (LSQ+: scales, and offsets of asymmetric grids), ``"scale"`` (LSQ),
            or ``None`` (fixed-range QAT: the calibrated ranges stay, only the weights train).
        weights, activations: which quantizers learn (the others keep their ranges).

    Returns the names of the quantizers that now learn. The plan (``sim.plan``) records ``learn`` in
    their specs, so a saved sim rebuilds them as they are. Before any training step the sim computes
    exactly what it computed before.
    """
    if learn not in LEARN_MODES:
        raise ValueError(f"learn must be one of {LEARN_MODES}, got {learn!r}")
    qs = sim.quantizers(include_disabled=True)
    cold = sorted(n for n, q in qs.items() if not q.is_initialized)
    if cold:
        raise NotCalibratedError(f"{len(cold)} quantizer(s) have no encoding ({', '.join(cold[:5])}): calibrate the sim "
                                 "(sim.calibrate(data) or edgequant.quantize) before quantization-aware training")
    roles = (_ROLES["weight"] if weights else ()) + (_ROLES["activation"] if activations else ())
    learning = []
    for name, q in qs.items():
        mode = learn if q.role in roles else None
        if q.spec.learn != mode:
            enc, frozen = q.encoding(), q.is_frozen
            new = sim.set_spec(name, replace(q.spec, learn=mode))
            new.set_encoding(enc)
            new.freeze(frozen)
        if mode:
            learning.append(name)
    return learning


def project_(sim) -> None:
    """Put every learned grid of ``sim`` back on its constraints (after an optimizer step)."""
    for q in sim.quantizers(include_disabled=True).values():
        if isinstance(q, LearnedQuantizer):
            q.project_()


def quantizer_parameters(sim) -> list[torch.nn.Parameter]:
    """The trainable scales and offsets of ``sim``'s quantizers."""
    return [p for q in sim.quantizers(include_disabled=True).values() if isinstance(q, Quantizer)
            for p in q.parameters(recurse=False)]
