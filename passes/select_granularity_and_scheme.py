"""select_granularity_and_scheme: per quantizer, pick granularity, scheme and scale (Q-HyViT).

For every activation quantizer ``Q_a`` (and, with ``weights``, every weight quantizer ``Q_w``)
in front of a conv2d / linear / matmul ``O = f(x, W)``, choose granularity
``g ∈ {per-tensor, per-channel}``, scheme ``s ∈ {symmetric, asymmetric}`` and scale ``Δ`` by

    (g, s, Δ) = argmin  Σ_ops  ΔOᵀ · diag((∂L/∂O)²) · ΔO,    ΔO = f(Q_a(x), Q_w(W)) − f(x, W)
    Δ ∈ {α + k(β − α)/(n − 1)} · Δ₀,  Δ₀ = max|x|/qmax (symmetric) or (max − min)/(2^b − 1)

(Lee et al. 2023, "Q-HyViT: Post-Training Quantization of Hybrid Vision Transformers with
Bridge Block Reconstruction", §4; the objective is PTQ4ViT's / BRECQ's Hessian-guided one).
``L = KL(softmax(z_fp) ‖ softmax(z_q))`` has zero gradient at the FP model, so ``(∂L/∂O)²``
is approximated, as BRECQ does, by the empirical Fisher: the squared per-sample gradient of the
cross-entropy of the FP logits against the FP model's own argmax labels, computed once by
autograd on the FP graph (quantizers off). Activation and weight scales are searched
alternately for ``rounds`` rounds, each against the others' current choice. Every op is
evaluated on sampled rows (im2col patches for conv, tokens for linear, head slices for matmul)
of ≤ ``images`` calibration images, so the search costs matmuls of at most ``max_rows`` rows;
the ranges behind ``Δ₀`` are the min/max over ``range_images`` images (default: all, as min-max
calibration uses; one float forward pass each), with ``holdout`` the calibration images other
than those ``images`` (when there are more): per-channel ranges from a few images clip unseen
ones badly, and measuring the error on images outside the ranges makes the choice see that.

Zero-point overflow: an asymmetric quantizer whose channel has ``min > 0`` or ``max < 0`` needs
``z = qmin − round(min/Δ)`` outside ``[qmin, qmax]``; the clamped zero-point shifts that channel.
Such candidates are detected, recorded and not chosen (another granularity or scheme is).

The chosen spec replaces the quantizer (a new FakeQuantizer under the same module name, scale
and zero-point set, quantizing); ``node.meta["hyq_choice"]`` of the quantizer's node (and of each
consumer op, by quantizer name) says why. Quantizers it cannot handle stay for ``calibrate``.
Invariant checked by the tests: the model output SQNR beats min-max calibration, the chosen
candidate has the least searched error, and overflowing candidates are never chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from tqdm.auto import tqdm

from hyq_fx.pass_base import (
    HyqPass,
    PassError,
    PassResult,
    QuantContext,
    get_tensor,
    quantizers,
    register_pass,
)
from hyq_fx.quantizer import FakeQuantizer
from hyq_fx.spec import QuantSpec
from hyq_fx.vocabulary import quantizers_mode

aten = torch.ops.aten

GRANULARITIES = ("per-tensor", "per-channel")
SCHEMES = ("symmetric", "asymmetric")
OBJECTIVES = ("fisher", "mse")
KINDS = {
    aten.conv2d.default: "conv2d",
    aten.linear.default: "linear",
    aten.matmul.default: "matmul",
}
_CHUNK_ELEMS = 1 << 23  # elements of one batched evaluation over several scales
_ROW_ELEMS = 1 << 19  # stored elements per sampled op (rows × (K + 2·Cout))


@dataclass
class _Op:
    """One quantized op, on sampled rows: ``out = f(x0, x1)`` in a canonical layout."""

    node: fx.Node
    kind: str
    groups: int = 1
    x: list[list[torch.Tensor]] = field(default_factory=lambda: [[], []])  # per operand, batches
    g2: list[torch.Tensor] = field(default_factory=list)
    weight: float = 1.0  # total rows / sampled rows (unbiased sum over all rows)
    fq: list[str | None] = field(default_factory=lambda: [None, None])
    _ref: torch.Tensor | None = None

    @property
    def ref(self) -> torch.Tensor:
        """The float output on the sampled rows (bias left out: it cancels in ΔO)."""
        if self._ref is None:
            self._ref = self.compute(self.x[0], self.x[1])
        return self._ref

    def finish(self) -> None:
        self.x = [torch.cat(parts) if parts else None for parts in self.x]  # type: ignore[misc]
        self.g2 = torch.cat(self.g2)  # type: ignore[assignment]

    def chan_dim(self, index: int) -> int:
        """Dim of the canonical operand that holds the quantizer's channel axis."""
        if self.kind == "conv2d":
            return -2 if index == 0 else -3  # x: [r, C, kk]; W: [Cout, C/G, kk]
        if self.kind == "linear":
            return -1 if index == 0 else -2  # x: [r, K]; W: [Cout, K]
        return -1 if index == 0 else -2  # a: [S, M, K]; b: [S, K, N]

    def compute(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return x0 @ x1.transpose(-1, -2)
        if self.kind == "matmul":
            return x0 @ x1
        g = self.groups
        xs = x0.reshape(*x0.shape[:-2], g, -1)  # [..., r, G, C/G·kk]
        w = x1.reshape(*x1.shape[:-3], g, x1.shape[-3] // g, -1)  # [..., G, Cout/G, C/G·kk]
        out = torch.einsum("...rgk,...gok->...rgo", xs, w)
        return out.reshape(*out.shape[:-2], -1)


@dataclass
class _Stats:
    lo_t: torch.Tensor | None = None
    hi_t: torch.Tensor | None = None
    lo_c: torch.Tensor | None = None
    hi_c: torch.Tensor | None = None

    def update(self, x: torch.Tensor, axis: int | None) -> None:
        x = x.detach().float()
        lo_t, hi_t = x.amin().reshape(1), x.amax().reshape(1)
        self.lo_t = lo_t if self.lo_t is None else torch.minimum(self.lo_t, lo_t)
        self.hi_t = hi_t if self.hi_t is None else torch.maximum(self.hi_t, hi_t)
        if axis is None:
            return
        flat = x.movedim(axis % x.dim(), 0).reshape(x.shape[axis], -1)
        lo_c, hi_c = flat.amin(1), flat.amax(1)
        self.lo_c = lo_c if self.lo_c is None else torch.minimum(self.lo_c, lo_c)
        self.hi_c = hi_c if self.hi_c is None else torch.maximum(self.hi_c, hi_c)


@dataclass
class _Choice:
    spec: QuantSpec
    scale: torch.Tensor
    zero_point: torch.Tensor
    error: float


def _fake_quant(x, scale, zp, qmin, qmax):
    """``(clamp(round(x/s) + z, qmin, qmax) − z)·s`` (plain rounding: no gradient needed)."""
    q = torch.div(x, scale).round_().add_(zp).clamp_(qmin, qmax).sub_(zp)
    return q.mul_(scale)


def _bcast(v: torch.Tensor, ndim: int, chan_dim: int | None) -> torch.Tensor:
    """``v`` of shape [S] or [S, C] viewed to broadcast over ``[S, *x.shape]`` (x has ndim)."""
    shape = [v.shape[0]] + [1] * ndim
    if v.dim() == 2 and v.shape[1] > 1:
        shape[1 + chan_dim % ndim] = v.shape[1]
    return v.reshape(shape)


def _spec_name(spec: QuantSpec) -> str:
    return f"{spec.granularity}/{spec.scheme}"


def _base_qparams(stats: _Stats, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Scale at factor 1, the (clamped) zero-point and the overflowing channels."""
    lo, hi = (stats.lo_c, stats.hi_c) if spec.per_channel else (stats.lo_t, stats.hi_t)
    if spec.symmetric:
        base = (torch.maximum(lo.abs(), hi.abs()) / spec.qmax).clamp_min(1e-12)
        return base, torch.zeros_like(base), []
    base = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(1e-12)
    z_raw = spec.qmin - torch.round(lo / base)
    overflow = ((z_raw < spec.qmin) | (z_raw > spec.qmax)).nonzero().flatten().tolist()
    return base, z_raw.clamp(spec.qmin, spec.qmax), overflow


@register_pass
class SelectGranularityAndScheme(HyqPass):
    """Choose per-quantizer granularity, scheme and scale by Fisher-weighted output error."""

    name = "select_granularity_and_scheme"

    def __init__(
        self,
        ctx: QuantContext | None = None,
        *,
        granularities: tuple[str, ...] | list[str] = GRANULARITIES,
        schemes: tuple[str, ...] | list[str] = SCHEMES,
        n_scales: int = 100,
        alpha: float = 0.01,
        beta: float = 1.2,
        rounds: int = 3,
        images: int = 32,
        range_images: int | None = None,
        holdout: bool = True,
        batch_size: int = 8,
        max_rows: int = 512,
        weights: bool = True,
        per_channel_ops: tuple[str, ...] | list[str] = ("conv2d", "linear"),
        objective: str = "fisher",
        allow_overflow: bool = False,
    ) -> None:
        super().__init__(ctx)
        where = "select_granularity_and_scheme"
        for what, given, known in (
            ("granularities", granularities, GRANULARITIES),
            ("schemes", schemes, SCHEMES),
            ("per_channel_ops", per_channel_ops, tuple(KINDS.values())),
        ):
            bad = sorted(set(given) - set(known))
            if bad or (what != "per_channel_ops" and not given):
                raise PassError(f"{where}: {what}={list(given)} is invalid; use some of {known}")
        if objective not in OBJECTIVES:
            raise PassError(f"{where}: objective={objective!r}; use one of {OBJECTIVES}")
        if not (0 < alpha < beta) or n_scales < 2 or rounds < 1 or images < 1 or max_rows < 1:
            raise PassError(
                f"{where}: need 0 < alpha < beta, n_scales >= 2, rounds, images, max_rows >= 1 "
                f"(got alpha={alpha}, beta={beta}, n_scales={n_scales}, rounds={rounds}, "
                f"images={images}, max_rows={max_rows})"
            )
        self.candidates = [
            (g == "per-channel", s == "symmetric") for g in granularities for s in schemes
        ]
        self.factors = torch.linspace(alpha, beta, n_scales)
        self.rounds, self.images, self.batch_size = rounds, images, batch_size
        self.range_images, self.holdout = range_images, holdout
        self.max_rows, self.weights = max_rows, weights
        self.per_channel_ops = set(per_channel_ops)
        self.objective, self.allow_overflow = objective, allow_overflow

    def requires(self, gm: fx.GraphModule) -> None:
        if not self.ctx.calib_batches:
            raise PassError(
                "select_granularity_and_scheme: no calibration data; pass calibration images "
                "to hyq_fx.quantize (a DataLoader or a list of tensors)"
            )
        if not any("hyq_quant" in n.meta for n in gm.graph.nodes):
            raise PassError(
                "select_granularity_and_scheme: the graph has no quantized ops; run "
                "insert_quantizers before this pass"
            )

    # ------------------------------------------------------------------ data collection

    def _images(self) -> list[torch.Tensor]:
        x = torch.cat(self.ctx.calib_batches)[: self.images]
        return list(x.split(self.batch_size))

    def _collect(self, gm: fx.GraphModule) -> tuple[dict[str, _Op], dict[str, _Stats]]:
        fq_mods = quantizers(gm)
        ops: dict[str, _Op] = {}
        for node in gm.graph.nodes:
            kind = KINDS.get(node.target) if node.op == "call_function" else None
            if kind is None or "hyq_quant" not in node.meta:
                continue
            if kind == "conv2d" and any(not isinstance(a, int) for a in self._conv_args(node)[3]):
                continue
            op = _Op(node, kind, groups=self._conv_args(node)[3][-1] if kind == "conv2d" else 1)
            for i in (0, 1):
                a = node.args[i]
                if isinstance(a, fx.Node) and a.op == "call_module" and a.target in fq_mods:
                    op.fq[i] = a.target
            ops[node.name] = op
        images = self._images()
        per_batch = max(1, math.ceil(self.max_rows / len(images)))
        gen = torch.Generator().manual_seed(self.ctx.seed)
        saved: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

        class _Tape(fx.Interpreter):
            def run_node(self, n: fx.Node):
                if n.name not in ops:
                    return super().run_node(n)
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                out = getattr(self, n.op)(n.target, args, kwargs)
                out.retain_grad()
                saved[n.name] = (args[0].detach(), args[1].detach(), out)
                return out

        bar = tqdm(images, desc="select: fisher", disable=not self.ctx.progress, leave=False)
        with quantizers_mode(gm, "off"), torch.enable_grad():
            for batch in bar:
                saved.clear()
                out = _Tape(gm).run(batch.clone().requires_grad_(True))
                logits = out[0] if isinstance(out, (tuple, list)) else out
                if logits.dim() > 2:  # dense outputs: classes along dim 1, per position
                    logits = logits.movedim(1, -1).reshape(-1, logits.shape[1])
                loss = F.cross_entropy(logits, logits.detach().argmax(-1), reduction="sum")
                loss.backward()
                for name, (x0, x1, y) in saved.items():
                    op = ops[name]
                    grad = y.grad if y.grad is not None else torch.zeros_like(y)
                    if self.objective == "mse":
                        grad = torch.ones_like(y)
                    self._sample(op, x0, x1, grad.detach(), per_batch, gen)
        for op in ops.values():
            op.finish()
        return ops, self._ranges(gm, ops)

    def _ranges(self, gm: fx.GraphModule, ops: dict[str, _Op]) -> dict[str, _Stats]:
        """Per-tensor and per-channel min/max of each activation quantizer's input, over
        ``range_images`` calibration images (one float forward pass each batch)."""
        first: dict[str, tuple[_Op, int]] = {}
        for op in ops.values():
            for i in (0, 1):
                if op.fq[i] is not None and op.node.args[i].args[0].op != "get_attr":
                    first.setdefault(op.fq[i], (op, i))
        stats = {name: _Stats() for name in first}
        modules = quantizers(gm)

        def hook(name: str):
            def observe(_module, args, _out) -> None:
                op, i = first[name]
                stats[name].update(args[0], self._tensor_axis(op, i, args[0].dim()))

            return observe

        handles = [modules[n].register_forward_hook(hook(n)) for n in first]
        images = torch.cat(self.ctx.calib_batches)
        if self.holdout and images.shape[0] > self.images:
            images = images[self.images :]  # not the images the errors are measured on
        if self.range_images is not None:
            images = images[: self.range_images]
        try:
            with quantizers_mode(gm, "off"), torch.no_grad():
                for batch in images.split(32):
                    gm(batch)
        finally:
            for h in handles:
                h.remove()
        return stats

    @staticmethod
    def _conv_args(node: fx.Node) -> tuple[Any, Any, Any, tuple]:
        """stride, padding, dilation (pairs) and all of them flat with groups last."""
        defaults = (None, [1, 1], [0, 0], [1, 1], 1)
        full = list(node.args[2:]) + list(defaults[len(node.args) - 2 :])
        pairs = [list(v) * (2 // len(v)) if isinstance(v, (list, tuple)) else [v, v]
                 for v in full[1:4]]  # fmt: skip
        return pairs[0], pairs[1], pairs[2], (*pairs[0], *pairs[1], *pairs[2], full[4])

    @staticmethod
    def _tensor_axis(op: _Op, index: int, ndim: int) -> int:
        """Channel axis of the real operand tensor that per-channel quantization uses."""
        if op.kind == "conv2d":
            return 1 if index == 0 else 0
        if op.kind == "linear":
            return ndim - 1 if index == 0 else 0
        return ndim - 1 if index == 0 else ndim - 2

    def _sample(self, op, x0, x1, grad, per_batch, gen) -> None:
        """Append sampled canonical rows of both operands and of ``grad²`` to ``op``."""
        if op.kind == "conv2d":
            stride, padding, dilation, _ = self._conv_args(op.node)
            kh, kw = x1.shape[-2:]
            cols = F.unfold(x0, (kh, kw), dilation=dilation, padding=padding, stride=stride)
            n, _, length = cols.shape
            rows_all = n * length
            cout, k = x1.shape[0], cols.shape[1]
            r = min(rows_all, per_batch, max(1, _ROW_ELEMS // (k + 2 * cout)))
            idx = torch.randperm(rows_all, generator=gen)[:r]
            rows = cols.permute(0, 2, 1).reshape(rows_all, x0.shape[1], kh * kw)[idx]
            g = grad.reshape(n, cout, length).permute(0, 2, 1).reshape(rows_all, cout)[idx]
            w = x1.reshape(cout, x1.shape[1], kh * kw)
        elif op.kind == "linear":
            flat = x0.reshape(-1, x0.shape[-1])
            g_flat = grad.reshape(-1, grad.shape[-1])
            rows_all = flat.shape[0]
            r = min(rows_all, per_batch, max(1, _ROW_ELEMS // (flat.shape[1] + 2 * x1.shape[0])))
            idx = torch.randperm(rows_all, generator=gen)[:r]
            rows, g, w = flat[idx], g_flat[idx], x1
        else:
            lead = torch.broadcast_shapes(x0.shape[:-2], x1.shape[:-2])
            a = x0.expand(*lead, *x0.shape[-2:]).reshape(-1, *x0.shape[-2:])
            b = x1.expand(*lead, *x1.shape[-2:]).reshape(-1, *x1.shape[-2:])
            g_flat = grad.reshape(-1, *grad.shape[-2:])
            rows_all = a.shape[0]
            per_slice = a[0].numel() + b[0].numel() + 2 * g_flat[0].numel()
            m = max(1, math.ceil(per_batch / a.shape[1]))  # slices ≈ per_batch rows
            r = min(rows_all, m, max(1, _ROW_ELEMS // per_slice))
            idx = torch.randperm(rows_all, generator=gen)[:r]
            rows, g, w = a[idx], g_flat[idx], b[idx]
        op.x[0].append(rows.float())
        if op.kind == "matmul" or not op.x[1]:
            op.x[1].append(w.float())
        op.g2.append(g.float().pow(2))
        op.weight = rows_all / r  # same for every batch (same shapes)

    # ------------------------------------------------------------------ the search

    def _candidate_specs(self, fq: FakeQuantizer, per_channel_ok: bool) -> list[QuantSpec]:
        specs = []
        for per_channel, symmetric in self.candidates:
            if per_channel and not per_channel_ok:
                continue
            specs.append(fq.spec.replace(per_channel=per_channel, symmetric=symmetric))
        if not specs:  # only per-channel asked for but not possible here: keep the scheme list
            specs = [fq.spec.replace(per_channel=False, symmetric=s) for _, s in self.candidates]
        return list(dict.fromkeys(specs))

    def _quantized(self, op: _Op, index: int, current: dict[str, _Choice]) -> torch.Tensor:
        x = op.x[index]
        name = op.fq[index]
        if name is None or name not in current:
            return x
        c = current[name]
        dim = op.chan_dim(index)
        return _fake_quant(
            x,
            _bcast(c.scale.reshape(1, -1), x.dim(), dim)[0],
            _bcast(c.zero_point.reshape(1, -1), x.dim(), dim)[0],
            c.spec.qmin,
            c.spec.qmax,
        )

    def _grid_errors(
        self, uses: list[tuple[_Op, int]], spec: QuantSpec, scales, zp, current, per_out: bool
    ) -> torch.Tensor:
        """Error of every row of ``scales`` ([S, C]): [S], or [S, Cout] when ``per_out``."""
        if spec.scale_type == "pow2":
            scales = torch.exp2(torch.ceil(torch.log2(scales.clamp_min(1e-12))))
        total = None
        for op, index in uses:
            other = self._quantized(op, 1 - index, current)
            x, ref, dim = op.x[index], op.ref, op.chan_dim(index)
            step = max(1, _CHUNK_ELEMS // max(1, x.numel() + ref.numel()))
            parts = []
            for s0 in range(0, scales.shape[0], step):
                s = _bcast(scales[s0 : s0 + step], x.dim(), dim)
                xq = _fake_quant(
                    x[None], s, _bcast(zp.reshape(1, -1), x.dim(), dim), spec.qmin, spec.qmax
                )
                out = op.compute(xq, other[None]) if index == 0 else op.compute(other[None], xq)
                err = out.sub_(ref[None]).square_().mul_(op.g2[None])
                err = err.flatten(1, -2).sum(1) if per_out else err.flatten(1).sum(1)
                parts.append(err * op.weight)
            errs = torch.cat(parts)
            total = errs if total is None else total + errs
        return total

    def _search(self, uses, spec: QuantSpec, stats: _Stats, current, per_out: bool, start):
        """Best grid index (one per output channel for per-channel weights) and its error.

        The grid ``factors`` (``n_scales`` points in [α, β]) is searched coarse to fine: every
        4th point, then the 9 points around the best; a later round (``start`` given) searches
        only the 9 points around its previous best, against the other quantizers' new choice.
        """
        base, zp, overflow = _base_qparams(stats, spec)
        n = len(self.factors)
        separable = per_out and spec.per_channel  # weights per output channel
        width = base.numel() if separable else 1

        def evaluate(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            errs = self._grid_errors(
                uses, spec, self.factors[idx] * base.reshape(1, -1), zp, current, per_out
            )
            if per_out and not separable:
                errs = errs.sum(1)
            errs = errs.reshape(idx.shape[0], -1)
            pick = errs.argmin(0)
            return idx.gather(0, pick[None])[0], errs.gather(0, pick[None])[0]

        if start is None:
            coarse = torch.unique(torch.cat([torch.arange(0, n, 4), torch.tensor([n - 1])]))
            start, _ = evaluate(coarse[:, None].expand(-1, width))
        window = (start[None] + torch.arange(-4, 5)[:, None]).clamp(0, n - 1)
        best, error = evaluate(window)
        scale = self.factors[best] * base
        if spec.scale_type == "pow2":
            scale = torch.exp2(torch.ceil(torch.log2(scale.clamp_min(1e-12))))
        choice = _Choice(spec, scale, zp.expand_as(scale).clone(), float(error.sum()))
        return choice, overflow, best

    def _choose(self, name, fq, uses, stats, current, per_out, record, starts) -> None:
        per_channel_ok = all(op.kind in self.per_channel_ops for op, _ in uses) and (
            len({self._spec_axis(u) for u in uses}) == 1
        )
        if per_out:  # a weight: keep its granularity and scheme, search its scale
            specs = [fq.spec]
        else:
            specs = self._candidate_specs(fq, per_channel_ok and stats.lo_c is not None)
        found: dict[str, tuple[_Choice, list[int], torch.Tensor]] = {}
        for spec in specs:
            if spec.per_channel and not per_out:
                spec = spec.replace(axis=self._spec_axis(uses[0]))
            key = _spec_name(spec)
            found[key] = self._search(uses, spec, stats, current, per_out, starts.get(key))
            starts[key] = found[key][2]
        allowed = {k: v for k, v in found.items() if self.allow_overflow or not v[1]}
        pool = allowed or found
        key = min(pool, key=lambda k: pool[k][0].error)
        current[name] = pool[key][0]
        record.update(
            {
                "granularity": current[name].spec.granularity,
                "scheme": current[name].spec.scheme,
                "factor": round(float(self.factors[pool[key][2]].mean()), 4),
                "errors": {k: float(v[0].error) for k, v in found.items()},
                "overflow_channels": {k: v[1] for k, v in found.items() if v[1]},
                "excluded": sorted(set(found) - set(allowed)),
            }
        )

    @staticmethod
    def _spec_axis(use: tuple[_Op, int]) -> int:
        op, index = use
        if op.kind == "conv2d":
            return 1
        return -1 if (op.kind == "linear" or index == 0) else -2

    # ------------------------------------------------------------------ the pass

    def call(self, gm: fx.GraphModule) -> PassResult:
        gm.recompile()  # the range pass runs the module's code, which must match its graph
        ops, stats = self._collect(gm)
        fq_mods = quantizers(gm)
        uses: dict[str, list[tuple[_Op, int]]] = {}
        for op in ops.values():
            for i in (0, 1):
                if op.fq[i] is not None:
                    uses.setdefault(op.fq[i], []).append((op, i))
        acts = [n for n in uses if fq_mods[n].role == "activation"]
        all_wts = [n for n in uses if fq_mods[n].role == "weight"]
        odd = [n for n in all_wts if fq_mods[n].spec.per_channel and fq_mods[n].spec.axis != 0]
        if odd and self.weights:
            raise PassError(
                f"select_granularity_and_scheme: weight quantizer '{odd[0]}' is per-channel "
                f"along axis {fq_mods[odd[0]].spec.axis}; only per-output-channel (axis 0) "
                "weights are supported (set weights=false to leave weights to calibrate)"
            )
        all_wts = [n for n in all_wts if n not in odd]  # those stay float during the search
        wts = all_wts if self.weights else []
        current: dict[str, _Choice] = {}
        for n in all_wts:  # weights start at min-max of their own spec (and stay, if not searched)
            wt = next(t for t in gm.graph.nodes if t.op == "call_module" and t.target == n)
            stats[n] = _Stats()
            stats[n].update(get_tensor(gm, wt.args[0]).detach(), 0)
            base, zp, _ = _base_qparams(stats[n], fq_mods[n].spec)
            current[n] = _Choice(fq_mods[n].spec, base, zp, math.inf)
        records: dict[str, dict[str, Any]] = {n: {"rounds": []} for n in acts + wts}
        starts: dict[str, dict[str, torch.Tensor]] = {n: {} for n in acts + wts}
        bar = tqdm(
            range(self.rounds), desc="select: search", disable=not self.ctx.progress, leave=False
        )
        for _ in bar:
            for group, per_out in ((acts, False), (wts, True)):
                for n in group:
                    self._choose(
                        n, fq_mods[n], uses[n], stats[n], current, per_out, records[n], starts[n]
                    )
                    records[n]["rounds"].append(records[n]["errors"].get(
                        _spec_name(current[n].spec), None))  # fmt: skip
        for n in acts + wts:
            self._install(gm, n, fq_mods[n], current[n], records[n], uses[n])
        self.ctx.log.append({"pass": self.name, "quantizers": len(acts) + len(wts)})
        return PassResult(gm, bool(acts or wts))

    def _install(self, gm, name, old: FakeQuantizer, choice: _Choice, record, uses) -> None:
        new = FakeQuantizer(choice.spec, old.observer_name, old.role)
        new.set_qparams(choice.scale, choice.zero_point)
        new.mode = "quantize"
        gm.add_submodule(name, new)
        record.update(
            {
                "objective": f"{self.objective} (argmax-label cross-entropy gradient²)"
                if self.objective == "fisher"
                else "unweighted output MSE",
                "bits": choice.spec.bits,
                "consumers": [op.node.name for op, _ in uses],
            }
        )
        if choice.scale.numel() == 1:
            record["scale"] = float(choice.scale)
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target == name:
                node.meta["hyq_choice"] = record
        for op, _ in uses:
            op.node.meta.setdefault("hyq_choice", {})[name] = {
                k: record[k] for k in ("granularity", "scheme", "factor", "errors")
            }

    def ensures(self, gm: fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            if "hyq_choice" in node.meta and node.op == "call_module":
                fq = gm.get_submodule(node.target)
                if not fq.calibrated or fq.mode != "quantize":
                    raise PassError(
                        f"select_granularity_and_scheme: quantizer '{node.target}' was chosen but "
                        "is not quantizing"
                    )
