"""The ``Encoding`` value type: everything needed to quantize one tensor."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .granularity import Granularity, PerBlock, PerChannel, PerTensor, check_granularity
from .quant import dequantize, fake_quantize, qrange, quantize


@dataclass(frozen=True, eq=False)
class Encoding:
    """Scale, zero point and integer grid of one tensor.

    ``scale`` and ``zero_point`` have ``granularity.param_shape(tensor.shape)``.

    >>> e = Encoding(torch.tensor(0.1), torch.tensor(0, dtype=torch.int32), bits=8, signed=True, symmetric=True)
    >>> e.qmin, e.qmax, [round(v, 4) for v in e.fake_quantize(torch.tensor([0.123, 50.0])).tolist()]
    (-128, 127, [0.1, 12.7])
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    signed: bool
    symmetric: bool
    narrow_range: bool = False
    granularity: Granularity = field(default_factory=PerTensor)

    def __post_init__(self):
        check_granularity(self.granularity)
        qrange(self.bits, self.signed, self.narrow_range)  # validates bits / narrow_range
        if self.scale.shape != self.zero_point.shape:
            raise ValueError(f"scale shape {tuple(self.scale.shape)} != zero_point shape {tuple(self.zero_point.shape)}")

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.signed, self.narrow_range)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.signed, self.narrow_range)[1]

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return quantize(x, self.scale, self.zero_point, self.qmin, self.qmax, self.granularity)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return dequantize(q, self.scale, self.zero_point, self.granularity)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax, self.granularity)

    # ---- serialization (plain JSON types; floats round-trip exactly through repr) ----
    def to_dict(self) -> dict:
        return {
            "bits": self.bits,
            "signed": self.signed,
            "symmetric": self.symmetric,
            "narrow_range": self.narrow_range,
            "granularity": granularity_to_dict(self.granularity),
            "shape": list(self.scale.shape),
            "scale": self.scale.detach().cpu().reshape(-1).tolist(),
            "zero_point": self.zero_point.detach().cpu().reshape(-1).tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "encoding") -> "Encoding":
        """Parse and validate; every error names ``where`` and the bad field."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
        missing = {"bits", "signed", "symmetric", "granularity", "shape", "scale", "zero_point"} - d.keys()
        if missing:
            raise ValueError(f"{where}: missing field(s) {sorted(missing)}")
        try:
            gran = granularity_from_dict(d["granularity"])
            shape = tuple(int(v) for v in d["shape"])
            scale = torch.tensor([float(v) for v in d["scale"]], dtype=torch.float32)
            zp_list = d["zero_point"]
            if any(float(v) != int(v) for v in zp_list):
                raise ValueError("zero_point values must be integers")
            zero_point = torch.tensor([int(v) for v in zp_list], dtype=torch.int32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: malformed field: {e}") from None
        n = math.prod(shape)
        if scale.numel() != n or zero_point.numel() != n:
            raise ValueError(f"{where}: shape {list(shape)} needs {n} values, got {scale.numel()} scales and {zero_point.numel()} zero points")
        if not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError(f"{where}: every scale must be finite and > 0")
        try:
            enc = cls(scale.reshape(shape), zero_point.reshape(shape), bits=d["bits"], signed=bool(d["signed"]),
                      symmetric=bool(d["symmetric"]), narrow_range=bool(d.get("narrow_range", False)), granularity=gran)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
        if ((zero_point < enc.qmin) | (zero_point > enc.qmax)).any():
            raise ValueError(f"{where}: zero_point outside the grid [{enc.qmin}, {enc.qmax}]")
        return enc


def granularity_to_dict(g: Granularity) -> dict:
    if isinstance(g, PerTensor):
        return {"type": "per_tensor"}
    if isinstance(g, PerChannel):
        return {"type": "per_channel", "axis": g.axis}
    return {"type": "per_block", "axis": g.axis, "block_size": g.block_size}


def granularity_from_dict(d) -> Granularity:
    if not isinstance(d, dict) or "type" not in d:
        raise ValueError(f"granularity must be an object with a 'type', got {d!r}")
    t = d["type"]
    if t == "per_tensor":
        return PerTensor()
    if t == "per_channel":
        return PerChannel(axis=d.get("axis"))
    if t == "per_block":
        return PerBlock(block_size=d.get("block_size", 32), axis=d.get("axis"))
    raise ValueError(f"unknown granularity type {t!r} (expected per_tensor, per_channel or per_block)")
