"""power_of_two_scales: restrict calibrated scales to powers of two, the exponent chosen by error.

For each selected quantizer with scale ``s`` (one per tensor, or one per channel) and zero-point
``z``, the new scale is ``s' = 2^k`` with::

    k ∈ {⌊log2 s⌋ − r, …, ⌈log2 s⌉ + r}                           (r = ``radius``, 2)
    k* = argmin_k ‖op(…, Q_{2^k, z'}(x), …) − op_fp(…)‖²           objective "output"
    k* = argmin_k ‖Q_{2^k, z'}(x) − x‖²                              objective "tensor"

where ``op`` is each conv / linear / matmul (any call) that consumes the quantizer, evaluated on
calibration images with every other quantizer as it is (already-converted ones included: the
quantizers are visited in graph order), and ``op_fp`` is its output in the float graph. An
asymmetric quantizer keeps the range it covered, ``[lo, hi] = [(qmin − z)s, (qmax − z)s]``:
``z' = qmin − round(lo/s')`` when ``s' ≥ s`` (the range still fits); when ``s' < s`` it cannot,
and the zero-point that clips the top, the bottom or both ends equally is chosen by the same
error. A per-channel weight is decided per output channel, exactly (output channel ``c`` depends
only on weight row ``c``); a per-channel activation, whose channels mix in the op, per channel by
its own quantization error (the output error under uncorrelated channel errors, up to a factor
that does not change the argmin). ``⌈log2 s⌉`` (what ``QuantSpec(scale_type="pow2")`` gives at
calibration) is the first candidate, so ties keep it and the output error never gets worse.

Power-of-two scales make requantization a bit shift (M2-ViT: Liang, Shi & Wang, "M2-ViT:
Accelerating Hybrid Vision Transformers with Two-Level Mixed Quantization", 2024; HyQ's
follow-up picks the exponent by the objective instead of rounding ``log2 s``). Converted
quantizers are replaced, under the same module name, by ones whose spec has
``scale_type="pow2"``, so exporters know. Invariant checked by the test: afterwards every
selected scale is exactly a power of two, and the output-chosen exponent has less output error
than ``⌈log2 s⌉``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx

from hyq_fx.fake_quant import SCALE_EPS
from hyq_fx.pass_base import (
    HyqPass,
    PassError,
    PassResult,
    first_images,
    get_tensor,
    quantizers,
    register_pass,
)
from hyq_fx.quantizer import FakeQuantizer
from hyq_fx.spec import QuantSpec

aten = torch.ops.aten

ROLES = ("activation", "weight")
OBJECTIVES = ("output", "tensor")
Candidate = tuple[torch.Tensor, torch.Tensor]


def is_power_of_two(scale: torch.Tensor) -> bool:
    """Whether every element of ``scale`` is exactly ``2^k``."""
    mantissa, _ = torch.frexp(scale.detach().float())
    return bool((mantissa == 0.5).all())


def replace_quantizer(
    gm: fx.GraphModule, name: str, spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor
) -> FakeQuantizer:
    """Swap the FakeQuantizer ``name`` for one with ``spec`` and these qparams (same name, role,
    observer and mode), so the graph is unchanged and the spec says what the scale is."""
    old = gm.get_submodule(name)
    new = FakeQuantizer(spec, old.observer_name, old.role)
    new.observer = old.observer
    new.set_qparams(scale.to(old.scale.device), zero_point.to(old.scale.device))
    new.mode = old.mode
    gm.add_submodule(name, new)
    return new


def channel_mse(diff: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Mean squared ``diff`` (float64): one value ``[1]``, or one per slice of ``axis`` ``[C]``."""
    if axis is None:
        return (torch.linalg.vector_norm(diff).double().square() / diff.numel()).reshape(1)
    axis = axis % diff.dim()
    others = [d for d in range(diff.dim()) if d != axis]
    per = torch.linalg.vector_norm(diff, dim=others).double().square()
    return per / (diff.numel() // diff.shape[axis])


def quantize_dequantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec, axis
) -> torch.Tensor:
    """``fake_quantize`` without the autograd machinery (the search needs no gradient)."""
    if scale.numel() == 1:
        s, z = scale.reshape(()), zero_point.reshape(())
    else:
        shape = [1] * x.dim()
        shape[axis % x.dim()] = -1
        s, z = scale.reshape(shape), zero_point.reshape(shape)
    q = torch.round(x / s).add_(z).clamp_(spec.qmin, spec.qmax)
    return q.sub_(z).mul_(s)


class Pow2Grid:
    """The power-of-two ``(scale, zero_point)`` candidates of one calibrated quantizer."""

    def __init__(self, spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.spec = spec
        self.scale = scale.detach().float().clamp_min(SCALE_EPS)
        zero_point = zero_point.detach().float()
        log2s = torch.log2(self.scale)
        self.k_floor, self.k_ceil = torch.floor(log2s), torch.ceil(log2s)
        self.lo = (spec.qmin - zero_point) * self.scale  # the range the quantizer covered
        self.hi = (spec.qmax - zero_point) * self.scale

    def at(self, k: torch.Tensor) -> list[Candidate]:
        """Candidates with scale ``2^k`` (elementwise per channel), zero-points as documented."""
        spec, s2 = self.spec, torch.exp2(k)
        if spec.symmetric:
            return [(s2, torch.zeros_like(s2))]
        low = torch.clamp(spec.qmin - torch.round(self.lo / s2), spec.qmin, spec.qmax)
        high = torch.clamp(spec.qmax - torch.round(self.hi / s2), spec.qmin, spec.qmax)
        mid = torch.round((spec.qmin + spec.qmax) / 2 - (self.lo + self.hi) / (2 * s2))
        mid = torch.clamp(mid, spec.qmin, spec.qmax)
        fits = s2 >= self.scale  # the whole range still fits: keep lo at qmin
        out: list[Candidate] = []
        for zp in (low, torch.where(fits, low, high), torch.where(fits, low, mid)):
            if not any(torch.equal(zp, z) for _, z in out):
                out.append((s2, zp))
        return out

    def all(self, radius: int) -> list[Candidate]:
        """``⌈log2 s⌉`` first, then every ``k`` in ``⌊log2 s⌋ − r … ⌈log2 s⌉ + r``."""
        out = self.at(self.k_ceil)
        for j in range(-radius, radius + 2):
            for s2, zp in self.at(self.k_floor + j):
                if not any(torch.equal(s2, s) and torch.equal(zp, z) for s, z in out):
                    out.append((s2, zp))
        return out


def _pick(
    cands: list[Candidate], error: Callable[[Candidate], torch.Tensor], best: tuple | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per channel, the candidate of least error (earlier ones win ties): ``(err, s, z)``."""
    for cand in cands:
        err = error(cand)
        if best is None:
            best = (err, cand[0].clone(), cand[1].clone())
            continue
        better = err < best[0]
        pairs = zip((err, *cand), best, strict=True)
        best = tuple(torch.where(better, new, old) for new, old in pairs)
    return best


def _output_axis(op: fx.Node, fq_node: fx.Node, fq: FakeQuantizer, ndim: int) -> int | None:
    """The axis of ``op``'s output that the quantizer's channels map to one-to-one, if any."""
    if not fq.spec.per_channel or len(fq_node.users) != 1:
        return None
    axis = fq.spec.axis % ndim
    index = next((i for i, a in enumerate(op.args[:2]) if a is fq_node), None)
    if op.target in (aten.conv2d.default, aten.linear.default) and index == 1 and axis == 0:
        return 1 if op.target is aten.conv2d.default else -1
    if op.target is aten.matmul.default:
        if index == 1 and axis == ndim - 1:
            return -1
        if index == 0 and ndim >= 2 and axis == ndim - 2:
            return -2
    return None


def _call(node: fx.Node, env: dict[fx.Node, object], override: dict | None = None):
    def look(a: fx.Node):
        return override[a] if override is not None and a in override else env[a]

    args = fx.node.map_arg(node.args, look)
    kwargs = fx.node.map_arg(node.kwargs, look)
    return node.target(*args, **kwargs)


class _DualRun:
    """Runs the graph on one batch twice at once, quantized (``q``) and float (``f``, every
    quantizer the identity), and lets ``decide`` change a quantizer before its first use."""

    def __init__(
        self,
        gm: fx.GraphModule,
        pending: set[str],
        decide: Callable[[fx.Node, torch.Tensor, list[tuple[fx.Node, Callable]]], None],
        objective: str,
    ) -> None:
        self.gm, self.pending, self.decide, self.objective = gm, pending, decide, objective

    def _evaluators(self, fq_node: fx.Node, q: dict, f: dict) -> list[tuple[fx.Node, Callable]]:
        """For each consumer whose inputs are computed: ``(op, fn)``, ``fn(x̂) -> (out, fp_out)``."""
        fns = []
        for user in fq_node.users:
            if user.op != "call_function":
                continue
            if not all(a in q for a in user.all_input_nodes):
                continue
            ref = _call(user, f)
            if not isinstance(ref, torch.Tensor):
                continue

            def fn(xq, user=user, ref=ref):
                return _call(user, q, {fq_node: xq}), ref

            fns.append((user, fn))
        return fns

    def run(self, x: torch.Tensor) -> None:
        nodes = list(self.gm.graph.nodes)
        last_use: dict[fx.Node, int] = {}
        for i, n in enumerate(nodes):
            for a in n.all_input_nodes:
                last_use[a] = i
        q: dict[fx.Node, object] = {}
        f: dict[fx.Node, object] = {}
        raw: dict[fx.Node, torch.Tensor] = {}
        placeholders = [n for n in nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise PassError(
                f"power_of_two_scales: the graph has {len(placeholders)} inputs; the exponent "
                "search runs graphs with a single image input (capture the model with one input)"
            )
        for i, n in enumerate(nodes):
            if n.op == "placeholder":
                q[n] = f[n] = x
            elif n.op == "get_attr":
                q[n] = f[n] = get_tensor(self.gm, n)
            elif n.op == "call_module":
                module = self.gm.get_submodule(n.target)
                if isinstance(module, FakeQuantizer):
                    src = n.args[0]
                    if n.target in self.pending:
                        consumers = [u for u in n.users if u.op == "call_function"]
                        if self.objective == "tensor" or not consumers:
                            self.decide(n, q[src], [])
                        else:
                            raw[n] = q[src]
                    q[n] = self.gm.get_submodule(n.target)(q[src])
                    f[n] = f[src]
                else:
                    q[n], f[n] = _call_module(module, n, q), _call_module(module, n, f)
            elif n.op == "call_function":
                for a in n.all_input_nodes:
                    if a in raw:  # first consumer of a pending quantizer: decide it now
                        self.decide(a, raw[a], self._evaluators(a, q, f))
                        q[a] = self.gm.get_submodule(a.target)(raw.pop(a))
                q[n], f[n] = _call(n, q), _call(n, f)
            elif n.op == "output":
                break
            for a in n.all_input_nodes:
                if last_use.get(a) == i:
                    q.pop(a, None)
                    f.pop(a, None)


def _call_module(module: torch.nn.Module, node: fx.Node, env: dict):
    args = fx.node.map_arg(node.args, lambda a: env[a])
    kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
    return module(*args, **kwargs)


@register_pass
class PowerOfTwoScales(HyqPass):
    """Restrict calibrated scales to 2^k, choosing k by the consuming op's output error."""

    name = "power_of_two_scales"

    def __init__(
        self,
        ctx=None,
        *,
        roles: tuple[str, ...] | list[str] = ("activation", "weight"),
        objective: str = "output",
        radius: int = 2,
        max_images: int = 32,
    ) -> None:
        super().__init__(ctx)
        bad = sorted(set(roles) - set(ROLES))
        if bad or not roles:
            raise PassError(f"power_of_two_scales: roles {list(roles)} invalid; use {list(ROLES)}")
        if objective not in OBJECTIVES:
            raise PassError(
                f"power_of_two_scales: objective {objective!r} is unknown; use one of {OBJECTIVES}"
            )
        if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
            raise PassError(f"power_of_two_scales: radius must be an integer >= 0, got {radius!r}")
        if max_images < 1:
            raise PassError(f"power_of_two_scales: max_images must be >= 1, got {max_images}")
        self.roles = tuple(roles)
        self.objective = objective
        self.radius = radius
        self.max_images = max_images
        self.stats = {"quantizers": 0, "channels": 0, "not_ceil": 0}

    def _selected(self, gm: fx.GraphModule) -> dict[str, FakeQuantizer]:
        return {n: fq for n, fq in quantizers(gm).items() if fq.role in self.roles}

    def requires(self, gm: fx.GraphModule) -> None:
        missing = [n for n, fq in self._selected(gm).items() if not fq.calibrated]
        if missing:
            raise PassError(
                f"power_of_two_scales: quantizer(s) {missing[:5]} are not calibrated; run "
                "'calibrate' before this pass in the recipe"
            )
        if not self.ctx.calib_batches:
            raise PassError(
                "power_of_two_scales: no calibration data; pass calibration images to "
                "hyq_fx.quantize (it chooses each exponent on them)"
            )

    def _decide(self, gm: fx.GraphModule, fq_node: fx.Node, x: torch.Tensor, evals) -> None:
        fq: FakeQuantizer = gm.get_submodule(fq_node.target)
        spec = fq.spec
        grid = Pow2Grid(spec, fq.scale, fq.zero_point)
        qaxis = spec.axis if spec.per_channel else None
        out_axis = _output_axis(evals[0][0], fq_node, fq, x.dim()) if len(evals) == 1 else None
        use_output = bool(evals) and (not spec.per_channel or out_axis is not None)

        def error(cand: Candidate) -> torch.Tensor:
            xq = quantize_dequantize(x, cand[0], cand[1], spec, qaxis)
            if not use_output:
                return channel_mse(xq - x, qaxis)
            return sum(channel_mse(out - ref, out_axis) for out, ref in (fn(xq) for _, fn in evals))

        if spec.per_channel:  # channels decide independently: try every exponent at once
            _, best_s, best_z = _pick(grid.all(self.radius), error)
        else:  # one exponent: walk from ⌈log2 s⌉ towards the side that lowers the error
            k_ceil = int(grid.k_ceil.item())
            best = _pick(grid.at(grid.k_ceil), error)
            best_k, step = k_ceil, 1
            down = _pick(grid.at(grid.k_ceil - 1), error)
            if down[0].item() < best[0].item():
                best, best_k, step = down, k_ceil - 1, -1
            k = best_k + step
            while int(grid.k_floor.item()) - self.radius <= k <= k_ceil + self.radius:
                trial = _pick(grid.at(torch.full_like(grid.k_ceil, k)), error)
                if not trial[0].item() < best[0].item():
                    break
                best, k = trial, k + step
            _, best_s, best_z = best
        self.stats["quantizers"] += 1
        self.stats["channels"] += best_s.numel()
        self.stats["not_ceil"] += int((best_s != torch.exp2(grid.k_ceil)).sum())
        replace_quantizer(gm, fq_node.target, spec.replace(scale_type="pow2"), best_s, best_z)

    def call(self, gm: fx.GraphModule) -> PassResult:
        selected = self._selected(gm)
        if not selected:
            return PassResult(gm, False)
        x = torch.cat(first_images(self.ctx.calib_batches, self.max_images))
        pending = set(selected)

        def decide(node: fx.Node, value: torch.Tensor, evals) -> None:
            self._decide(gm, node, value, evals)
            pending.discard(node.target)

        with torch.no_grad():
            _DualRun(gm, pending, decide, self.objective).run(x)
        if pending:
            raise PassError(
                f"power_of_two_scales: quantizer(s) {sorted(pending)[:5]} were not reached by "
                "the calibration input; they feed no computed op"
            )
        self.ctx.log.append({"pass": self.name, "objective": self.objective, **self.stats})
        return PassResult(gm, True)

    def ensures(self, gm: fx.GraphModule) -> None:
        for name, fq in self._selected(gm).items():
            if fq.spec.scale_type != "pow2" or not is_power_of_two(fq.scale):
                raise PassError(f"power_of_two_scales: quantizer '{name}' has a non-pow2 scale")
