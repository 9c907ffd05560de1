"""`FakeQuantizer`: the module that passes insert into the graph, one per quantized tensor.

Its life has three modes:

* ``observe``: calibration; the observer records the tensor, which passes through unchanged;
* ``quantize``: the deployed behaviour, ``x̂ = (clamp(round(x/s) + z, qmin, qmax) - z) · s``;
* ``off``: identity (useful to measure one layer's contribution to the error).

Scale and zero-point are buffers, so ``state_dict`` and safetensors carry them; the spec and
mode are plain data in :meth:`config`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .fake_quant import fake_quantize, qparams_from_range
from .observers import make_observer
from .spec import QuantSpec

MODES = ("observe", "quantize", "off")


class FakeQuantizer(nn.Module):
    def __init__(self, spec: QuantSpec, observer: str = "minmax", role: str = "activation") -> None:
        super().__init__()
        self.spec = spec
        self.observer_name = observer
        self.role = role
        self.mode = "observe"
        self.observer = make_observer(observer, spec)
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1))

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown quantizer mode {mode!r}; use one of {MODES}")
        if mode == "quantize" and not self.calibrated:
            raise RuntimeError("quantizer has no scale yet: calibrate before switching to quantize")
        self.mode = mode

    @property
    def calibrated(self) -> bool:
        return bool(getattr(self, "_calibrated", False))

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale = scale.detach().float().reshape(-1).clone()
        self.zero_point = zero_point.detach().float().reshape(-1).clone()
        self._calibrated = True

    def calibrate(self) -> None:
        """Turn what the observer saw into a scale and zero-point, and start quantizing."""
        lo, hi = self.observer.range_for(self.spec)
        self.set_qparams(*qparams_from_range(lo, hi, self.spec))
        self.mode = "quantize"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            self.observer.observe(x)
            return x
        if self.mode == "off":
            return x
        axis = self.spec.axis if self.spec.per_channel else None
        return fake_quantize(x, self.scale, self.zero_point, self.spec.qmin, self.spec.qmax, axis)

    def config(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "observer": self.observer_name,
            "role": self.role,
            "mode": self.mode,
            "calibrated": self.calibrated,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FakeQuantizer:
        fq = cls(QuantSpec.from_dict(config["spec"]), config["observer"], config["role"])
        fq._calibrated = bool(config.get("calibrated", False))
        fq.mode = config.get("mode", "observe")
        return fq

    def extra_repr(self) -> str:
        return (
            f"{self.spec.describe()}, {self.role}, observer={self.observer_name}, mode={self.mode}"
        )
