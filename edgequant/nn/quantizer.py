"""The ``Quantizer`` module: fake quantization with its state in buffers."""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ..config.spec import QuantSpec
from ..core.encoding import Encoding
from ..core.granularity import from_groups
from ..core.quant import MIN_SCALE, fake_quantize, fill_empty_ranges, grid_range, lsq_fake_quantize, qrange
from ..errors import NotCalibratedError
from ..observers.ranges import compute_qparams, make_observer
from ..observers.stats import HistogramObserver

#: what a quantizer quantizes: a parameter, a model input, an op's output inside the model, a model output
ROLES = ("weight", "input", "activation", "output")


class Quantizer(nn.Module):
    r"""Fake-quantizes a tensor on a fixed integer grid.

    .. math::
        \hat x = (\mathrm{clamp}(\mathrm{round}(x / s) + z, q_{min}, q_{max}) - z) \cdot s

    ``scale`` (``s``), ``zero_point`` (``z``) and ``initialized`` are buffers, so they live in
    ``state_dict``. A quantizer that is present is enabled; ``with q.calibrating(): ...`` makes it
    observe its inputs (and pass them through unchanged) and sets the encoding on exit.

    Args:
        spec: a resolved :class:`QuantSpec` (``signed`` set, granularity axis concrete).
        tensor_shape: shape of the tensor it quantizes (sets the shape of ``scale``).
        name: the tensor's name, used in encodings files and error messages.

    >>> q = Quantizer(QuantSpec(bits=8, symmetric=True, signed=True), torch.Size([4]), "x")
    >>> with q.calibrating():
    ...     _ = q(torch.tensor([-1.0, 0.5, 2.54, 0.0]))
    >>> q(torch.tensor([1.0, 3.0])).tolist()
    [1.0, 2.5399999618530273]
    """

    #: set by ``QuantSim.integer_exact()``: computes what the integer kernel computes (a class default,
    #: so quantizers pickled before it existed still run)
    _exact = None
    #: groups whose calibration range was empty (all zeros); see core.quant.fill_empty_ranges
    empty_groups = 0
    #: the largest share, over groups, of the calibration values that fell outside the grid
    clipped = 0.0

    def __init__(self, spec: QuantSpec, tensor_shape: torch.Size, name: str, role: str = "activation", owner_type: str = ""):
        super().__init__()
        if spec.signed is None:
            raise ValueError(f"{name}: QuantSpec.signed must be resolved before building a Quantizer")
        if role not in ROLES:
            raise ValueError(f"{name}: quantizer role must be one of {ROLES}, got {role!r}")
        self._spec = spec
        self.tensor_name = name
        self.role = role
        self.owner_type = owner_type
        self.tensor_shape = torch.Size(tensor_shape)
        self.qmin, self.qmax = qrange(spec.bits, spec.signed, spec.narrow_range)
        shape = spec.granularity.param_shape(self.tensor_shape)
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.register_buffer("initialized", torch.tensor(False))
        # a frozen encoding is kept by sim.calibrate (AdaRound freezes the weights it rounded)
        self.register_buffer("frozen", torch.tensor(False))
        self._ready = False  # mirror of `initialized`, avoids a device sync per forward
        self._observer = None

    @property
    def spec(self) -> QuantSpec:
        """The grid this quantizer was built for (read-only: ``qmin``, ``qmax`` and the scale's shape
        follow from it; change it with ``sim.set_spec(name, spec)``, which builds a new quantizer)."""
        return self._spec

    @spec.setter
    def spec(self, value):
        raise AttributeError(f"{self.tensor_name}: Quantizer.spec is read-only (qmin/qmax and the scale shape follow "
                             "from it); use sim.set_spec(name, spec), which rebuilds the quantizer")

    def __setstate__(self, state):
        if "spec" in state:  # pickled before the spec became read-only
            state["_spec"] = state.pop("spec")
        super().__setstate__(state)

    @property
    def is_weight(self) -> bool:
        return self.role == "weight"

    def extra_repr(self) -> str:
        s = self.spec
        g = type(s.granularity).__name__
        return (f"{self.tensor_name!r}, bits={s.bits}, {'symmetric' if s.symmetric else 'asymmetric'}, "
                f"{'signed' if s.signed else 'unsigned'}, {g}, range={s.range_method}")

    # ---- use ----
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observer is not None:
            self._observer.update(x)
            return x
        if not self._ready:
            raise NotCalibratedError(
                f"quantizer for {self.tensor_name!r} has no encoding yet: call sim.calibrate(data) "
                "or sim.load_encodings(path) before running the sim"
            )
        if self._exact is not None:
            return self._exact(self, x)
        return fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax, self.spec.granularity)

    # ---- calibration ----
    @contextlib.contextmanager
    def calibrating(self, reduce=None):
        """Observe inputs inside the block; compute and set the encoding when it exits normally.

        ``reduce``: a list; ``(self, observer)`` is appended to it instead, and the caller sets the encoding
        (``set_from_observer``) once the observers of several processes are merged (distributed calibration).
        """
        self._observer = make_observer(self.spec.range_method, self.spec.granularity, self.tensor_name, self.spec.bins)
        try:
            yield self
            observer = self._observer
        finally:
            self._observer = None
        if reduce is not None:
            reduce.append((self, observer))
        elif not observer.empty:
            self.set_from_observer(observer)

    @torch.no_grad()
    def set_from_observer(self, observer) -> None:
        s = self.spec
        scale, zp = compute_qparams(observer, s.range_method, self.qmin, self.qmax, s.symmetric, percentile=s.percentile)
        scale, self.empty_groups = fill_empty_ranges(scale)
        if isinstance(observer, HistogramObserver):
            lo, hi = grid_range(scale, zp, self.qmin, self.qmax)  # a value within half a step of the grid rounds onto it
            self.clipped = float(observer.fraction_outside(lo - scale / 2, hi + scale / 2).max())
        shape = observer.shape if observer.shape is not None else self.tensor_shape
        self._set(from_groups(scale, shape, s.granularity), from_groups(zp, shape, s.granularity))

    @property
    def range_collapsed(self) -> bool:
        """Whether the last calibration saw only zeros (every group's range was empty)."""
        return self.empty_groups > 0 and self.empty_groups == self.scale.numel()

    @torch.no_grad()
    def calibrate_from(self, x: torch.Tensor) -> None:
        """Set the encoding from one tensor (used for weights)."""
        obs = make_observer(self.spec.range_method, self.spec.granularity, self.tensor_name, self.spec.bins, exact=True)
        obs.update(x)
        self.set_from_observer(obs)

    def _set(self, scale, zero_point):
        if tuple(scale.shape) != tuple(self.scale.shape):
            raise ValueError(f"{self.tensor_name}: encoding shape {tuple(scale.shape)} does not match the quantizer's {tuple(self.scale.shape)}")
        self.scale.copy_(scale.to(self.scale))
        self.zero_point.copy_(zero_point.to(self.zero_point))
        self.initialized.fill_(True)
        self._ready = True

    def scalar_grid(self) -> tuple[float, int]:
        """``(scale, zero_point)`` of a per-tensor grid as Python numbers (the integer arithmetic's operands)."""
        return float(self.scale.detach().reshape(-1)[0]), int(self.zero_point.reshape(-1)[0])

    # ---- encodings ----
    @property
    def is_initialized(self) -> bool:
        return self._ready

    @property
    def is_frozen(self) -> bool:
        return bool(self.frozen)

    def freeze(self, frozen: bool = True) -> None:
        """Keep the current encoding when the sim is calibrated again."""
        self.frozen.fill_(frozen)

    def encoding(self) -> Encoding:
        if not self._ready:
            raise NotCalibratedError(f"quantizer for {self.tensor_name!r} has no encoding yet")
        s = self.spec
        return Encoding(self.scale.detach().clone(), self.zero_point.detach().clone(), bits=s.bits, signed=s.signed,
                        symmetric=s.symmetric, narrow_range=s.narrow_range, granularity=s.granularity)

    @torch.no_grad()
    def check_encoding(self, enc: Encoding) -> None:
        """Raise ValueError unless ``enc`` has this quantizer's grid, granularity and scale shape."""
        s = self.spec
        mine = (s.bits, s.signed, s.symmetric, s.narrow_range, s.granularity)
        theirs = (enc.bits, enc.signed, enc.symmetric, enc.narrow_range, enc.granularity)
        if mine != theirs:
            raise ValueError(
                f"{self.tensor_name}: encoding (bits, signed, symmetric, narrow_range, granularity)={theirs} "
                f"does not match this quantizer's {mine}; build the sim with the config the encodings came from"
            )
        if tuple(enc.scale.shape) != tuple(self.scale.shape):
            raise ValueError(f"{self.tensor_name}: encoding shape {list(enc.scale.shape)} does not match the "
                             f"quantizer's {list(self.scale.shape)}")

    def set_encoding(self, enc: Encoding) -> None:
        """Set scale and zero point from ``enc``; its grid and granularity must match this quantizer's."""
        self.check_encoding(enc)
        self._set(enc.scale, enc.zero_point)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.initialized)


class LearnedQuantizer(Quantizer):
    r"""A :class:`Quantizer` whose grid trains with the model (``QuantSpec.learn``): the scale is an
    ``nn.Parameter`` (LSQ), and with ``learn="scale_offset"`` on an asymmetric grid so is a float
    ``offset`` whose rounding is the zero point (LSQ+). The gradients are those of
    :func:`~edgequant.core.quant.lsq_fake_quantize`, with LSQ's scaling ``1 / sqrt(n qmax)``.

    The encoding stays integral at every step: ``zero_point`` is read as ``clamp(round(offset))``, and the
    scale is used clamped to at least ``MIN_SCALE`` on every forward and projected onto that constraint
    whenever the encoding is read (and by :func:`edgequant.qat.project_` after each optimizer step). The
    state_dict keys are those of a :class:`Quantizer` (``scale``, ``zero_point`` when the offset is fixed),
    plus ``offset`` when it is learned.
    """

    def __init__(self, spec: QuantSpec, tensor_shape: torch.Size, name: str, role: str = "activation", owner_type: str = ""):
        super().__init__(spec, tensor_shape, name, role=role, owner_type=owner_type)
        self.scale = nn.Parameter(self._buffers.pop("scale"))
        self.learns_offset = spec.learn == "scale_offset" and not spec.symmetric
        if self.learns_offset:
            self.offset = nn.Parameter(self._buffers.pop("zero_point").float())

    def __getattr__(self, name):
        if name == "zero_point" and "offset" in self._parameters:
            return self._parameters["offset"].detach().round().clamp(self.qmin, self.qmax).to(torch.int32)
        return super().__getattr__(name)

    @torch.no_grad()
    def project_(self) -> None:
        """Put the learned values back on their constraints (scale >= MIN_SCALE, offset inside the grid)."""
        self.scale.clamp_(min=MIN_SCALE)
        if self.learns_offset:
            self.offset.clamp_(self.qmin, self.qmax)

    @torch.no_grad()
    def _set(self, scale, zero_point):
        if tuple(scale.shape) != tuple(self.scale.shape):
            raise ValueError(f"{self.tensor_name}: encoding shape {tuple(scale.shape)} does not match the quantizer's {tuple(self.scale.shape)}")
        self.scale.copy_(scale.to(self.scale))
        (self.offset if self.learns_offset else self._buffers["zero_point"]).copy_(zero_point.to(torch.float32))
        self.initialized.fill_(True)
        self._ready = True

    def encoding(self) -> Encoding:
        self.project_()
        return super().encoding()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observer is not None or not self._ready or self._exact is not None:
            return super().forward(x)
        # clamped out of place: a quantizer called several times in one forward (a recurrent cell's, once per
        # time step) must not change a tensor that autograd saved (project_() after each optimizer step)
        scale = self.scale.clamp(min=MIN_SCALE)
        if not torch.is_grad_enabled():
            return fake_quantize(x, scale.detach(), self.zero_point, self.qmin, self.qmax, self.spec.granularity)
        groups = self.scale.numel()
        n = x.numel() if self.is_weight or x.dim() == 0 else x.numel() // max(x.shape[0], 1)
        g = 1.0 / math.sqrt(max(n / groups, 1.0) * self.qmax)
        offset = self.offset.clamp(self.qmin, self.qmax) if self.learns_offset else self._buffers["zero_point"]
        return lsq_fake_quantize(x, scale, offset, self.qmin, self.qmax, self.spec.granularity, g)


def make_quantizer(spec: QuantSpec, tensor_shape, name: str, role: str = "activation", owner_type: str = "") -> Quantizer:
    """The one factory of quantizers: the kind of quantizer follows from the spec (``spec.learn``: a
    :class:`LearnedQuantizer` for quantization-aware training), so every caller builds them the same way."""
    cls = LearnedQuantizer if spec.learn else Quantizer
    return cls(spec, torch.Size(tensor_shape), name, role=role, owner_type=owner_type)
