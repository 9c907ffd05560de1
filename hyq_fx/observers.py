"""Observers: record what flows through a tensor during calibration and turn it into a range.

Each observer sees tensors in ``observe()`` and returns ``(lo, hi)`` from ``range_for(spec)``,
one element per tensor or one per channel along ``spec.axis``. The range goes through
:func:`hyq_fx.fake_quant.qparams_from_range` to become a scale and zero-point.

* ``minmax``: the running minimum and maximum (the naive baseline).
* ``percentile``: clip to the ``p`` and ``1 - p`` quantiles, ``p`` searched over
  {0.999, 0.9999, 0.99999, 1} for the least L2 quantization error (as RepQ-ViT does).
* ``mse``: shrink the min-max range by a factor ``α ∈ [0.05, 1]`` chosen for the least
  L2 quantization error on the recorded values.
"""

from __future__ import annotations

import torch

from .fake_quant import quantize_with_spec
from .spec import QuantSpec

SAMPLES_PER_BATCH = 1 << 16
MAX_SAMPLES = 1 << 20


def _as_channels(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``x`` as ``[C, N]`` (per-channel along spec.axis) or ``[1, N]`` (per-tensor)."""
    x = x.detach().float()
    if not spec.per_channel:
        return x.reshape(1, -1)
    axis = spec.axis % x.dim()
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


class Observer:
    name = "base"

    def __init__(self, spec: QuantSpec) -> None:
        self.spec = spec
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.batches = 0

    def observe(self, x: torch.Tensor) -> None:
        flat = _as_channels(x, self.spec)
        lo, hi = flat.amin(dim=1), flat.amax(dim=1)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            if lo.shape != self.lo.shape:
                raise ValueError(
                    f"observer saw {lo.numel()} channels after {self.lo.numel()}: the observed "
                    "tensor changed its channel count between calibration batches"
                )
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        self.batches += 1

    @property
    def ready(self) -> bool:
        return self.lo is not None

    def range_for(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise RuntimeError(
                "observer has seen no data: run calibration batches through it first"
            )
        return self.lo, self.hi


class MinMaxObserver(Observer):
    name = "minmax"


class _SamplingObserver(Observer):
    """Keeps a deterministic random sample of the values (per channel) for searches."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__(spec)
        self._samples: list[torch.Tensor] = []
        self._kept = 0
        self._gen = torch.Generator().manual_seed(0)

    def observe(self, x: torch.Tensor) -> None:
        super().observe(x)
        flat = _as_channels(x, self.spec)
        if self._kept >= MAX_SAMPLES:
            return
        n = flat.shape[1]
        per_channel_budget = max(SAMPLES_PER_BATCH // flat.shape[0], 16)
        if n > per_channel_budget:
            idx = torch.randperm(n, generator=self._gen)[:per_channel_budget]
            flat = flat[:, idx]
        self._samples.append(flat)
        self._kept += flat.numel()

    def samples(self) -> torch.Tensor:
        return torch.cat(self._samples, dim=1)

    def _error(self, values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        spec = self.spec.replace(axis=0) if self.spec.per_channel else self.spec
        q = quantize_with_spec(values, spec, lo, hi)
        return (q - values).pow(2).mean(dim=1)

    def _pick(self, values, candidates) -> tuple[torch.Tensor, torch.Tensor]:
        best_err, best_lo, best_hi = None, None, None
        for lo, hi in candidates:
            err = self._error(values, lo, hi)
            if best_err is None:
                best_err, best_lo, best_hi = err, lo.clone(), hi.clone()
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, lo, best_lo)
            best_hi = torch.where(better, hi, best_hi)
        return best_lo, best_hi


class PercentileObserver(_SamplingObserver):
    name = "percentile"
    percentiles = (0.999, 0.9999, 0.99999, 1.0)

    def range_for(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        super().range_for(spec)
        values = self.samples()
        candidates = []
        for p in self.percentiles:
            if p >= 1.0:
                candidates.append((self.lo, self.hi))
                continue
            qs = torch.quantile(values, torch.tensor([1.0 - p, p]), dim=1)
            candidates.append((qs[0], qs[1]))
        return self._pick(values, candidates)


class MSEObserver(_SamplingObserver):
    name = "mse"
    factors = torch.linspace(0.05, 1.0, 40).tolist()

    def range_for(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        super().range_for(spec)
        values = self.samples()
        candidates = [(self.lo * f, self.hi * f) for f in self.factors]
        return self._pick(values, candidates)


OBSERVERS: dict[str, type[Observer]] = {
    cls.name: cls for cls in (MinMaxObserver, PercentileObserver, MSEObserver)
}


def make_observer(name: str, spec: QuantSpec) -> Observer:
    try:
        return OBSERVERS[name](spec)
    except KeyError:
        raise ValueError(
            f"unknown observer {name!r}; choose one of {', '.join(sorted(OBSERVERS))}"
        ) from None
