"""The quantization plan: every tensor that can be quantized, its role and its resolved spec.

A :class:`QuantConfig` says what to do in general (defaults, per-type and per-name overrides); a
:class:`QuantPlan` says what is done to each tensor of one captured model. QuantSim resolves the
config into a plan once (``sim.plan``) and builds its quantizers from the plan; mixed precision,
QAT and the CLI edit or read plans (``plan.with_spec(name, spec)``, ``QuantSim(model, x, plan=plan)``).

Roles:

* ``weight``     -- a layer's parameter;
* ``input``      -- a model input;
* ``activation`` -- the output of an op inside the model;
* ``output``     -- the output of an op that leaves the model (a classifier's logits);
* ``bias``       -- a layer's bias, on the int32 grid ``s_in * s_w`` derived from its input and weight
  quantizers (``source`` names them); it has no spec of its own.

``spec=None`` means the tensor stays in float. Specs in a plan are resolved: ``signed`` is set and
per-channel / per-block axes are concrete.

>>> from edgequant.config import QuantSpec
>>> plan = QuantPlan({"fc.weight": PlanEntry("weight", QuantSpec(bits=8, symmetric=True, signed=True), "Linear", (4, 3))})
>>> plan2 = plan.with_spec("fc.weight", QuantSpec(bits=4, symmetric=True))
>>> plan2["fc.weight"].spec.bits, plan2["fc.weight"].spec.signed, plan["fc.weight"].spec.bits
(4, True, 8)
>>> QuantPlan.from_json(plan2.to_json()) == plan2
True
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Iterator, Mapping, Optional

from ..core.granularity import resolve_axis
from ..errors import PlanError
from .spec import QuantSpec, read_json

PLAN_FORMAT = "edgequant.plan"
PLAN_VERSION = 1
ROLES = ("weight", "bias", "input", "activation", "output")


@dataclass(frozen=True)
class PlanEntry:
    """One tensor of the plan.

    Args:
        role: one of :data:`ROLES`.
        spec: the resolved spec, or None (float; for a bias: see ``source``).
        owner_type: class name of the layer it belongs to, the functional op's name, or ``"input"``.
        shape: the tensor's shape when the plan was made (sets the shape of scales).
        channel_axis: the axis ``PerChannel()`` / ``PerBlock()`` without an axis resolve to.
        nonneg: the producer's output is never negative (``signed=None`` resolves to unsigned).
        source: for a bias, ``(input tensor name, weight tensor name)``.
    """
    role: str
    spec: Optional[QuantSpec]
    owner_type: str = ""
    shape: tuple = ()
    channel_axis: int = 0
    nonneg: bool = False
    source: tuple = ()

    def __post_init__(self):
        if self.role not in ROLES:
            raise PlanError(f"plan role must be one of {ROLES}, got {self.role!r}")
        if self.spec is not None and not isinstance(self.spec, QuantSpec):
            raise PlanError(f"a plan entry's spec must be a QuantSpec or None, got {self.spec!r}")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "source", tuple(self.source))

    def resolve(self, spec: Optional[QuantSpec]) -> Optional[QuantSpec]:
        """``spec`` with ``signed`` and the granularity axis filled in for this tensor."""
        if spec is None:
            return None
        if self.role == "bias":
            raise PlanError("a bias has no spec of its own: it follows its input and weight quantizers")
        if spec.signed is None:
            spec = replace(spec, signed=True if self.role == "weight" else not self.nonneg)
        return replace(spec, granularity=resolve_axis(spec.granularity, self.channel_axis))

    def to_dict(self) -> dict:
        return {"role": self.role, "spec": None if self.spec is None else self.spec.to_dict(),
                "owner_type": self.owner_type, "shape": list(self.shape), "channel_axis": self.channel_axis,
                "nonneg": self.nonneg, "source": list(self.source)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "PlanEntry":
        if not isinstance(d, Mapping) or "role" not in d:
            raise PlanError(f"a plan entry must be an object with a 'role', got {d!r}")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise PlanError(f"unknown plan entry field(s) {sorted(unknown)}")
        kw = dict(d)
        if kw.get("spec") is not None:
            kw["spec"] = QuantSpec.from_dict(kw["spec"])
        return cls(**kw)


class QuantPlan(Mapping):
    """``{tensor name: PlanEntry}`` for one model, read-only; edits return a new plan."""

    def __init__(self, entries: Mapping[str, PlanEntry]):
        for name, e in entries.items():
            if not isinstance(e, PlanEntry):
                raise PlanError(f"plan entry {name!r} must be a PlanEntry, got {type(e).__name__}")
        self._entries = dict(entries)

    def __getitem__(self, name: str) -> PlanEntry:
        try:
            return self._entries[name]
        except KeyError:
            close = [n for n in self._entries if name.split(".")[0] in n][:5] or list(self._entries)[:5]
            raise KeyError(f"{name!r} is not a tensor of this plan (names look like {close})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other) -> bool:
        return isinstance(other, QuantPlan) and self._entries == other._entries

    def __repr__(self) -> str:
        n = sum(e.spec is not None for e in self._entries.values())
        return f"QuantPlan({len(self)} tensors, {n} quantized)"

    # ---- queries and edits ----
    def quantized(self, role: Optional[str] = None) -> dict[str, PlanEntry]:
        """Entries with a spec (optionally of one role)."""
        return {n: e for n, e in self._entries.items() if e.spec is not None and (role is None or e.role == role)}

    def with_spec(self, name: str, spec: Optional[QuantSpec]) -> "QuantPlan":
        """A new plan in which tensor ``name`` has ``spec`` (resolved for it; None: float)."""
        e = self[name]
        return QuantPlan({**self._entries, name: replace(e, spec=e.resolve(spec))})

    def with_specs(self, specs: Mapping[str, Optional[QuantSpec]]) -> "QuantPlan":
        """:meth:`with_spec` for several tensors at once."""
        entries = dict(self._entries)
        for name, spec in specs.items():
            e = self[name]
            entries[name] = replace(e, spec=e.resolve(spec))
        return QuantPlan(entries)

    # ---- JSON ----
    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION,
                "tensors": {n: e.to_dict() for n, e in self._entries.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> "QuantPlan":
        if not isinstance(d, Mapping) or d.get("format") != PLAN_FORMAT:
            raise PlanError(f"not an edgequant plan (expected \"format\": \"{PLAN_FORMAT}\")")
        if d.get("version") != PLAN_VERSION:
            raise PlanError(f"plan version is {d.get('version')!r}; this edgequant reads version {PLAN_VERSION}")
        tensors = d.get("tensors")
        if not isinstance(tensors, Mapping):
            raise PlanError("a plan needs a 'tensors' object")
        return cls({n: PlanEntry.from_dict(e) for n, e in tensors.items()})

    def to_json(self, indent: int = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "QuantPlan":
        return cls.from_dict(read_json(text, "plan", PlanError))
