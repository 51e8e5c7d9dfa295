"""Typed, validated quantization configuration.

A :class:`QuantSpec` says how one tensor role is quantized; a :class:`QuantConfig` gives defaults for
weights and activations plus overrides per module type and per module name (glob patterns). Presets
(``"w8a8"``, ``"w4a8"``, ...) are ready-made configs. Everything round-trips through JSON with a schema
version.

>>> cfg = QuantConfig.preset("w4a8")
>>> cfg.weight.bits, cfg.weight.granularity, cfg.activation.bits
(4, PerChannel(axis=None), 8)
>>> QuantConfig.from_json(cfg.to_json()) == cfg
True
"""
from __future__ import annotations

import copy
import fnmatch
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Mapping, Optional

from ..core.encoding import granularity_from_dict, granularity_to_dict
from ..core.granularity import Granularity, PerChannel, PerTensor, check_granularity
from ..core.quant import qrange
from ..observers.ranges import RANGE_METHODS

SCHEMA_VERSION = 2  # 2: input_range_method (version 1 files read with None, their inputs' old grids)
#: what quantization-aware training may learn of a grid (``QuantSpec.learn``)
LEARN_MODES = (None, "scale", "scale_offset")


def read_json(text: str, what: str, error: type = ValueError):
    """``json.loads(text)``; invalid JSON raises ``error`` naming ``what`` and the position."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{what} is not valid JSON: {e}") from None


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor.

    Args:
        bits: integer bit-width, 2..16.
        symmetric: symmetric grid (zero_point fixed) or asymmetric (zero_point chosen from the range).
        signed: signed grid (``[-2**(b-1), 2**(b-1)-1]``) or unsigned (``[0, 2**b-1]``). ``None`` means
            "auto": unsigned where the producer is ReLU-like (ReLU, ReLU6, sigmoid, softmax), signed
            elsewhere (QuantSim resolves it per tensor).
        narrow_range: drop the most negative code of a signed grid (``[-127, 127]`` at 8 bits).
        granularity: ``PerTensor()``, ``PerChannel(axis)`` or ``PerBlock(block_size, axis)``.
        range_method: one of ``minmax``, ``ema``, ``mean_minmax`` (mean over samples of per-sample
            extremes), ``percentile``, ``mse``, ``sqnr``.
        percentile: for ``range_method="percentile"``, in (50, 100].
        bins: histogram bins for the histogram-based methods.
        learn: quantization-aware training of the grid: ``None`` (fixed: the calibrated range stays),
            ``"scale"`` (LSQ: the scale is a trainable parameter) or ``"scale_offset"`` (LSQ+: the scale
            and, on asymmetric grids, a float offset whose rounding is the zero point).
    """

    bits: int = 8
    symmetric: bool = False
    signed: Optional[bool] = None
    narrow_range: bool = False
    granularity: Granularity = field(default_factory=PerTensor)
    range_method: str = "minmax"
    percentile: float = 99.99
    bins: int = 2048
    learn: Optional[str] = None

    def __post_init__(self):
        for name in ("symmetric", "narrow_range"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"QuantSpec.{name} must be a bool, got {getattr(self, name)!r}")
        if self.signed is not None and not isinstance(self.signed, bool):
            raise TypeError(f"QuantSpec.signed must be True, False or None (auto), got {self.signed!r}")
        qrange(self.bits, True if self.signed is None else self.signed, self.narrow_range and self.signed is not False)
        if self.narrow_range and self.signed is False:
            raise ValueError("narrow_range needs a signed grid")
        check_granularity(self.granularity)
        if self.range_method not in RANGE_METHODS:
            raise ValueError(f"range_method must be one of {RANGE_METHODS}, got {self.range_method!r}")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if not isinstance(self.bins, int) or self.bins < 8:
            raise ValueError(f"bins must be an int >= 8, got {self.bins!r}")
        if self.learn not in LEARN_MODES:
            raise ValueError(f"learn must be one of {LEARN_MODES}, got {self.learn!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["granularity"] = granularity_to_dict(self.granularity)
        if d["learn"] is None:  # files of fixed grids read as before in versions without QAT
            del d["learn"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "QuantSpec":
        if not isinstance(d, Mapping):
            raise TypeError(f"a QuantSpec must be a JSON object, got {d!r}")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown QuantSpec field(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        d = dict(d)
        if "granularity" in d:
            d["granularity"] = granularity_from_dict(d["granularity"])
        return cls(**d)


_UNSET = "unset"
_ROLES = ("weight", "activation")


@dataclass(frozen=True)
class Override:
    """Per-type or per-name override. A field left at ``"unset"`` keeps the default; ``None`` disables
    that quantizer (e.g. ``Override(activation=None)`` leaves a layer's output activation in float)."""

    weight: object = _UNSET
    activation: object = _UNSET

    def __post_init__(self):
        for name in _ROLES:
            v = getattr(self, name)
            if not (v == _UNSET or v is None or isinstance(v, QuantSpec)):
                raise TypeError(f"Override.{name} must be a QuantSpec, None (disable) or left unset, got {v!r}")

    def to_dict(self) -> dict:
        out = {}
        for name in _ROLES:
            v = getattr(self, name)
            if v != _UNSET:
                out[name] = None if v is None else v.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> "Override":
        d = dict(d)
        if "output" in d and "activation" not in d:  # the name of schema 1 files written before 0.2
            d["activation"] = d.pop("output")
        unknown = set(d) - set(_ROLES)
        if unknown:
            raise ValueError(f"unknown override field(s) {sorted(unknown)}; use 'weight' and/or 'activation'")
        return cls(**{k: (None if v is None else QuantSpec.from_dict(v)) for k, v in d.items()})


class FrozenDict(dict):
    """A dict that refuses changes (the overrides of a frozen :class:`QuantConfig`); copies are plain dicts."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("a QuantConfig is immutable: build a new one, e.g. dataclasses.replace(cfg, module_names={...})")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse

    def __reduce__(self):
        return (FrozenDict, (dict(self),))

    def __deepcopy__(self, memo):
        return FrozenDict({k: v for k, v in self.items()})


PLACEMENTS = ("outputs", "products")


@dataclass(frozen=True)
class QuantConfig:
    """Defaults for weights and activations, with overrides.

    Args:
        weight: spec for weights of Conv/ConvTranspose/Linear/Embedding (``None``: weights stay float).
        activation: spec for activations: model inputs and op outputs (``None``: activations stay float).
        module_types: ``{"Linear": Override(...)}``, keyed by class name; matches subclasses too.
        module_names: ``{"classifier.*": Override(...)}``, glob patterns on module names (and on the
            names of the model's inputs, for their activation spec); these win over ``module_types``,
            and later patterns win over earlier ones.
        supergroups: give conv/linear/bn/add followed by ReLU-like activations one output quantizer
            after the activation (as a fused kernel would compute them).
        quantize_inputs: quantize the model's float inputs.
        output_range_method: the range method of the quantizers of the model's outputs (a classifier's
            logits), in place of the activation spec's: ``"minmax"`` by default, because percentile
            clipping saturates exactly the largest logits, which decide the prediction. ``None`` keeps
            the activation spec's method. A ``module_names`` override of that output wins over it.
        input_range_method: the range method of the quantizers of the model's float inputs, whose grids
            are then asymmetric: ``"minmax"`` by default. A model input is data already bounded by its
            preprocessing (normalized photos span [-2.12, 2.64] on ImageNet's statistics), so its full
            range costs no outlier steps, while the symmetric mean of per-sample extremes clipped every
            bright pixel. On MobileNetV2 (W8A8 default recipe) this gained up to 0.8 dB logit SQNR on 8
            of 10 photo partitions and calibration sizes, and lost 0.1 dB on the other two
            (``benchmarks/results/splits.md``).
            ``None`` keeps the activation spec. A ``module_names`` override of an input wins over it.
        activation_placement: ``"outputs"`` (default): every op that computes gets an output quantizer, as an
            integer-only runtime needs. ``"products"``: an activation keeps its quantizer only where a product
            reads it (a conv or linear layer, a matmul, through reshapes and other moves); adds, normalizations
            and the model's outputs stay in float between them, as ONNX Runtime's and NNCF's transformer
            quantization place them (the ``w8a8_transformer`` preset: see its docstring for what it measures).
            A ``module_names`` override that sets an activation spec keeps that quantizer either way. Applies to
            graph capture (a model in leaf fallback keeps every output quantizer).
    """

    weight: Optional[QuantSpec] = field(default_factory=lambda: QuantSpec(bits=8, symmetric=True, signed=True, granularity=PerChannel()))
    activation: Optional[QuantSpec] = field(default_factory=lambda: QuantSpec(bits=8, symmetric=False))
    module_types: Mapping[str, Override] = field(default_factory=dict)
    module_names: Mapping[str, Override] = field(default_factory=dict)
    supergroups: bool = True
    quantize_inputs: bool = True
    output_range_method: Optional[str] = "minmax"
    input_range_method: Optional[str] = "minmax"
    activation_placement: str = "outputs"

    def __post_init__(self):
        if self.activation_placement not in PLACEMENTS:
            raise ValueError(f"activation_placement must be one of {PLACEMENTS}, got {self.activation_placement!r}")
        for name in ("output_range_method", "input_range_method"):
            v = getattr(self, name)
            if v is not None and v not in RANGE_METHODS:
                raise ValueError(f"{name} must be one of {RANGE_METHODS} or None, got {v!r}")
        for name in ("weight", "activation"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, QuantSpec):
                raise TypeError(f"QuantConfig.{name} must be a QuantSpec or None, got {v!r}")
        if self.weight is not None and self.weight.signed is None:
            object.__setattr__(self, "weight", replace(self.weight, signed=True))
        for name in ("module_types", "module_names"):
            m = getattr(self, name)
            if not isinstance(m, Mapping):
                raise TypeError(f"QuantConfig.{name} must be a dict of name -> Override")
            for k, v in m.items():
                if isinstance(k, type):
                    raise TypeError(f"QuantConfig.{name} keys are strings: use {k.__name__!r} instead of {k.__name__}")
                if not isinstance(k, str) or not isinstance(v, Override):
                    raise TypeError(f"QuantConfig.{name}[{k!r}] must map a string to an Override, got {v!r}")
            object.__setattr__(self, name, FrozenDict(m))

    # ---- lookup ----
    def _named(self, role: str, module_name: str):
        """The ``role`` spec the last matching ``module_names`` pattern sets for ``module_name``, or unset."""
        spec = _UNSET
        for pattern, o in self.module_names.items():
            if fnmatch.fnmatchcase(module_name, pattern) and getattr(o, role) != _UNSET:
                spec = getattr(o, role)
        return spec

    def names_activation(self, module_name: str) -> bool:
        """Whether a ``module_names`` pattern sets the activation spec of ``module_name``."""
        return self._named("activation", module_name) != _UNSET

    def input_spec(self, input_name: str) -> Optional[QuantSpec]:
        """The spec of the quantizer of the model's float input ``input_name`` (None: it stays float)."""
        if self.names_activation(input_name):  # module_names={"x": Override(activation=...)} names an input
            return self.spec_for("activation", input_name, ())
        spec = self.activation if self.quantize_inputs else None
        if spec is not None and self.input_range_method is not None:
            spec = replace(spec, range_method=self.input_range_method, symmetric=False)
        return spec

    def spec_for(self, role: str, module_name: str, module_type_names: tuple[str, ...]) -> Optional[QuantSpec]:
        """The spec for ``role`` ("weight" or "activation") of the module ``module_name`` whose class and
        base classes are named ``module_type_names`` (most specific first)."""
        if role not in _ROLES:
            raise ValueError(f"role must be one of {_ROLES}, got {role!r}")
        spec = self.weight if role == "weight" else self.activation
        for tname in reversed(module_type_names):  # base classes first, the class itself last
            o = self.module_types.get(tname)
            if o is not None and getattr(o, role) != _UNSET:
                spec = getattr(o, role)
        named = self._named(role, module_name)
        return spec if named == _UNSET else named

    # ---- presets ----
    @classmethod
    def preset(cls, name: str) -> "QuantConfig":
        """A named preset: ``w8a8``, ``w7a8``, ``w4a8``, ``w8a16``, ``w4a16`` (per-channel symmetric weights;
        ``w7a8`` runs exactly on the fast int8 kernels of x86 CPUs without VNNI),
        ``w8a8_per_tensor``, ``w4a8_per_tensor`` (per-tensor symmetric weights)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return copy.deepcopy(PRESETS[name])  # a copy: a change to it never reaches other users of the preset

    @classmethod
    def coerce(cls, config) -> "QuantConfig":
        """Accept a preset name, a QuantConfig, or a dict/JSON string of one."""
        if config is None:
            return cls()
        if isinstance(config, QuantConfig):
            return config  # immutable: sharing it is safe
        if isinstance(config, str):
            if config.lstrip().startswith("{"):
                return cls.from_json(config)
            return cls.preset(config)
        if isinstance(config, Mapping):
            return cls.from_dict(config)
        raise TypeError(f"config must be a preset name, a QuantConfig or a dict, got {type(config).__name__}")

    # ---- JSON ----
    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "weight": None if self.weight is None else self.weight.to_dict(),
            "activation": None if self.activation is None else self.activation.to_dict(),
            "module_types": {k: v.to_dict() for k, v in self.module_types.items()},
            "module_names": {k: v.to_dict() for k, v in self.module_names.items()},
            "supergroups": self.supergroups,
            "quantize_inputs": self.quantize_inputs,
            "output_range_method": self.output_range_method,
            "input_range_method": self.input_range_method,
            "activation_placement": self.activation_placement,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "QuantConfig":
        d = dict(d)
        version = d.pop("schema_version", None)
        if version not in (1, SCHEMA_VERSION):
            raise ValueError(f"config schema_version is {version!r}; this edgequant reads versions 1 and {SCHEMA_VERSION}")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown QuantConfig field(s) {sorted(unknown)}")
        kw = dict(d)
        if version == 1:  # written before input_range_method existed: the inputs took the activation spec
            kw.setdefault("input_range_method", None)
        for role in ("weight", "activation"):
            if role in kw and kw[role] is not None:
                kw[role] = QuantSpec.from_dict(kw[role])
        for name in ("module_types", "module_names"):
            if name in kw:
                kw[name] = {k: Override.from_dict(v) for k, v in kw[name].items()}
        return cls(**kw)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "QuantConfig":
        return cls.from_dict(read_json(text, "config", ValueError))


def _preset(wbits: int, abits: int, per_channel: bool, w_method: str = "minmax", a_method: str = "mean_minmax",
            a_symmetric: bool = True) -> QuantConfig:
    """8-bit activations: symmetric grids (unsigned after ReLU-like ops) over the mean of per-sample
    extremes. On MobileNetV2 over five photo partitions this beat the earlier asymmetric 99.99th
    percentile (see ``benchmarks/results/splits.md``): a running extreme is set by one outlier crop, and
    an asymmetric range clips the short side of signed tensors (residual sums) where a symmetric one
    does not. 16-bit grids have the steps to spare and keep min-max."""
    gran = PerChannel() if per_channel else PerTensor()
    return QuantConfig(
        weight=QuantSpec(bits=wbits, symmetric=True, signed=True, granularity=gran, range_method=w_method),
        activation=QuantSpec(bits=abits, symmetric=a_symmetric, range_method=a_method),
    )


def _transformer_preset() -> QuantConfig:
    """W8A8 for transformers: 8-bit weights per channel (embeddings per row), 8-bit asymmetric min-max
    activations, and the residual stream (LayerNorm outputs and the residual sums) on 16-bit grids.
    Transformers carry a few outlier dimensions in the residual stream (Bondarenko et al., 2021); an
    8-bit grid wide enough for them leaves the other dimensions a handful of steps. On all-MiniLM-L6-v2
    (sentence-embedding cosine to FP32, held-out sentences): plain ``w8a8`` 0.60, asymmetric min-max
    0.84, with the residual stream at 16 bits 0.994 (``benchmarks/results/transformers.md``).

    Activations are quantized only where a product reads them (``activation_placement="products"``: the inputs
    of linear layers and of both attention matmuls); the residual sums, the attention scores before softmax,
    the layer outputs before GELU and the pooled output stay float, as ONNX Runtime's ``quantize_static`` and
    NNCF place them. On MiniLM (two sentence splits, sim and ONNX Runtime alike) this raised the cosine from
    0.9942 / 0.9941 to 0.9958 / 0.9958, and with ``smooth_linear_inputs`` from 0.9932 / 0.9933 to 0.9950 /
    0.9950; that export ran 1.07x / 1.02x the speed of ``quantize_static``'s at batch 1 / 32 where it ran
    1.16x / 0.91x with every op output quantized (one run, AMD EPYC with AVX-512 VNNI, 2 threads)."""
    base = _preset(8, 8, True, a_method="minmax", a_symmetric=False)
    wide = Override(activation=QuantSpec(bits=16, symmetric=False, range_method="minmax"))
    return replace(base, module_types={"LayerNorm": wide, "add": wide}, activation_placement="products")


PRESETS: dict[str, QuantConfig] = {
    "w8a8": _preset(8, 8, True),
    # 7-bit weights: x86 CPUs without VNNI add pairs of u8 x s8 products in saturating int16; with
    # |w| <= 64 the pair sums fit, so ONNX Runtime's fast u8s8 kernels stay exact (its reduce_range)
    "w7a8": _preset(7, 8, True),
    "w4a8": _preset(4, 8, True, w_method="mse"),
    "w8a16": _preset(8, 16, True, a_method="minmax", a_symmetric=False),
    "w4a16": _preset(4, 16, True, w_method="mse", a_method="minmax", a_symmetric=False),
    "w8a8_transformer": _transformer_preset(),
    "w8a8_per_tensor": _preset(8, 8, False),
    "w4a8_per_tensor": _preset(4, 8, False, w_method="mse"),
}
