"""`QuantSpec`: what a quantizer does to a tensor, as plain data.

A uniform quantizer with scale ``s``, zero-point ``z`` and ``b`` bits maps
``q = clamp(round(x / s) + z, qmin, qmax)`` and back ``x̂ = (q - z) · s``.

* symmetric: ``z = 0`` and the narrow signed range ``[-(2^(b-1) - 1), 2^(b-1) - 1]``
  (zero sits exactly in the middle, as int8 weight kernels expect);
* asymmetric: the unsigned range ``[0, 2^b - 1]`` with an integer ``z``;
* per-tensor, or per-channel along ``axis`` (one ``s``/``z`` per slice);
* ``scale_type="pow2"`` restricts ``s`` to ``2^k`` so requantization is a shift.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

MIN_BITS, MAX_BITS = 2, 16
SCALE_TYPES = ("float", "pow2")


class QuantSpecError(ValueError):
    """A quantizer specification that cannot be honoured."""


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 8
    symmetric: bool = False
    per_channel: bool = False
    axis: int = 0
    scale_type: str = "float"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise QuantSpecError(f"bits must be an integer, got {self.bits!r}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise QuantSpecError(
                f"bits={self.bits} is outside the supported range {MIN_BITS}..{MAX_BITS}; "
                f"pick a bit width between {MIN_BITS} and {MAX_BITS} (8 is the usual choice)"
            )
        if self.scale_type not in SCALE_TYPES:
            raise QuantSpecError(
                f"scale_type={self.scale_type!r} is unknown; use one of {', '.join(SCALE_TYPES)}"
            )

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def granularity(self) -> str:
        return "per-channel" if self.per_channel else "per-tensor"

    @property
    def scheme(self) -> str:
        return "symmetric" if self.symmetric else "asymmetric"

    def replace(self, **changes: Any) -> QuantSpec:
        return QuantSpec(**{**asdict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise QuantSpecError(
                f"unknown QuantSpec field(s) {unknown}; the fields are {sorted(known)}"
            )
        return cls(**data)

    def describe(self) -> str:
        pow2 = ", pow2 scale" if self.scale_type == "pow2" else ""
        return f"{self.bits}-bit {self.scheme} {self.granularity}{pow2}"
