"""scale_bottleneck_outliers: learn per-input-channel factors α that move a 1x1 conv's input
outliers into its weights (HyQ quantization-aware distribution scaling).

For a pointwise op ``y = W·x`` (1x1 conv2d with groups 1, or linear; ``W`` is [C_out, C_in])
with an activation quantizer ``Q_a`` (scale ``s``, zero-point ``z``) and a weight quantizer
``Q_w``, any ``α > 0`` leaves the float op unchanged, ``W·x = (W·diag(α))·(x/α)``, and α is
learned for the quantized op (Kim, Lee & Kim, "HyQ: Hardware-Friendly Post-Training
Quantization for CNN-Transformer Hybrid Networks", IJCAI 2024, §3.2; the notes' "Kim & Kim
2025")::

    α* = argmin_α  E_x Σ_o F_o·( W·x − Q_w(W·diag(α)) · Q_a(x/α) )_o²

over input vectors sampled on the calibration batches, by Adam on ``log α`` (cosine lr 1e-2,
straight-through rounding, the weight scale differentiable). ``F_o = 1`` is the paper's
objective (``weighting="uniform"``); the default ``"fisher"`` weighs output channel ``o`` by
``E[(∂L/∂y_o)²]`` (BRECQ's diagonal Fisher, ``L`` the cross-entropy against the float model's
own prediction), because a lower uniform error at one layer does not always lower the network's.
The start is the best of ``α = 1`` (the paper's) and ``α = a^t`` for t in (0.25 .. 1), ``a_c``
the factor that makes channel ``c`` span the quantizer's range. ``Q_a`` keeps its calibrated
``(s, z)``, so α is in effect a learned per-channel activation scale ``s·α_c``; α never makes
``x/α`` clip more than ``Q_a`` clips ``x`` (unless ``clip=True``). The result is placed in the
graph in one of two ways:

* **folded** (exact, no extra op at run time): when ``x`` is the output of a per-channel affine
  op — conv2d / linear (a folded BatchNorm included), layer_norm, group_norm or batch_norm — reached
  directly or through value-moving ops only (reshape, permute, im2col...), and nothing else reads
  it, the producer's per-channel weight and bias are divided by α and the consumer's weight is
  multiplied by α: ``conv(Q_a(x/α), Q_w(W·α))``.
* **per-channel quantizer**: otherwise (e.g. SiLU between the producer and the 1x1 conv, as in
  timm's MV2 blocks, where ``x/α`` cannot be folded through the nonlinearity) the activation
  quantizer becomes per-channel with scales ``s·α_c`` and the shared ``z``, and the weight path
  becomes ``Q_w(W·α)·diag(α)⁻¹``, which is the same computation:
  ``Q_w(W·α)·diag(α)⁻¹·diag(α)·Q_a(x/α)``. An integer kernel runs it with the integer
  activations of ``x/α`` and the integer weights of ``W·α``.

Both forms run as ordinary int8 convs in the ONNX and TVM backends (the α of the quantizer and
of the weight cancel in the integer sum). ``min_bits`` / ``max_bits`` restrict the pass to a range
of activation bit widths (the default recipe: 5–7, where it measured a gain). The layers of each
kind are listed in ``ctx.log``. Weight quantizers whose tensor changed are
re-calibrated with their own observer; a layer whose quantization error does not drop is left as
it was. Runs after ``insert_quantizers`` + ``calibrate``.
Invariants checked by the tests: with quantizers off the rewritten graph computes what it
computed before (1e-5), and the quantized output error of the rewritten layers drops.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from hyq_fx.fake_quant import SCALE_EPS, fake_quantize, pow2_scale
from hyq_fx.pass_base import (
    HyqPass,
    PassError,
    PassResult,
    add_constant,
    check_bits_option,
    get_tensor,
    quantizers,
    register_pass,
)
from hyq_fx.patterns import is_op, match_all, wildcard
from hyq_fx.quantizer import FakeQuantizer
from hyq_fx.vocabulary import MOVES_VALUES, arg, owner_of, quantizer_of, quantizers_mode

aten = torch.ops.aten

OPS = {"conv2d": aten.conv2d.default, "linear": aten.linear.default}
PLACEMENTS = ("auto", "quantizer", "fold")
WEIGHTINGS = ("uniform", "fisher")
FISHER_BATCHES = 4  # calibration batches used to estimate the output channels' Fisher weights
EVAL_EVERY = 25  # steps between evaluations of the objective on all samples
INIT_POWERS = (0.0, 0.25, 0.5, 0.75, 1.0)  # starting points α = a^t (see learn_alpha)
LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))  # α ∈ [0.01, 100]
CONSUMER = is_op(*OPS.values())(wildcard(), wildcard(), ...).named("op")

# affine producers: (channel axis of the output, indices of per-channel weight and bias args)
AFFINE = {
    aten.conv2d.default: (1, 1, 2),
    aten.linear.default: (-1, 1, 2),
    aten.layer_norm.default: (-1, 2, 3),
    aten.group_norm.default: (1, 2, 3),
    aten.batch_norm.default: (1, 1, 2),
}


@dataclass
class _Candidate:
    op: fx.Node  # the 1x1 conv / linear
    act: fx.Node  # its activation FakeQuantizer node
    x: fx.Node  # the quantizer's input
    weight: fx.Node  # the weight get_attr
    wfq: fx.Node  # the weight FakeQuantizer node
    axis: int  # channel axis of x
    chain: list[fx.Node] | None = None  # producer … x when x/α can be folded
    perm: torch.Tensor | None = None  # consumer channel c reads producer channel perm[c]


def _set_module(gm: fx.GraphModule, target: str, module: torch.nn.Module) -> None:
    owner, name = owner_of(gm, target)
    setattr(owner, name, module)


def _recalibrated(old: FakeQuantizer, tensor: torch.Tensor) -> FakeQuantizer:
    """A fresh quantizer with ``old``'s spec and observer, calibrated on ``tensor``."""
    new = FakeQuantizer(old.spec, old.observer_name, old.role)
    new.observer.observe(tensor.detach())
    new.calibrate()
    return new


def _quantize_weight(w: torch.Tensor, fq: FakeQuantizer) -> torch.Tensor:
    """``Q_w(w)`` with min-max parameters of ``fq``'s spec recomputed from ``w``; the scale keeps
    its gradient (as in LSQ), so α sees how it widens a row's range."""
    spec = fq.spec
    flat = w.reshape(w.shape[0], -1) if spec.per_channel else w.reshape(1, -1)
    lo = torch.minimum(flat.amin(1), torch.zeros(()))
    hi = torch.maximum(flat.amax(1), torch.zeros(()))
    if spec.symmetric:
        scale = torch.maximum(-lo, hi) / spec.qmax
        zp = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (spec.qmax - spec.qmin)
        zp = torch.clamp(
            spec.qmin - torch.round(lo / scale.clamp_min(SCALE_EPS)), spec.qmin, spec.qmax
        )
    scale = scale.clamp_min(SCALE_EPS)
    if spec.scale_type == "pow2":
        scale = pow2_scale(scale.detach())
    axis = 0 if spec.per_channel else None
    return fake_quantize(w, scale, zp.detach(), spec.qmin, spec.qmax, axis)


def learn_alpha(
    x: torch.Tensor,
    weight: torch.Tensor,
    act: FakeQuantizer,
    wfq: FakeQuantizer,
    channel_range: tuple[torch.Tensor, torch.Tensor],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    clip: bool = False,
    out_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float, float]:
    """α (one per input channel) minimising ``‖x·Wᵀ − Q_a(x/α)·Q_w(W·α)ᵀ‖²``.

    ``x`` is [N, C_in] (sampled input vectors), ``weight`` [C_out, C_in], ``channel_range``
    each input channel's (min, max) over all calibration data. Returns α and the mean squared
    error before (α = 1) and after, both on all of ``x``.

    * Start: the best on the objective of ``α = a^t``, ``t ∈ INIT_POWERS``, where ``a_c`` makes
      channel ``c`` span the quantizer's range (``t = 0`` is the paper's ``α = 1``; ``t = 1``
      per-channel min-max; ``t = 0.5`` SmoothQuant's balance). Adam on ``log α`` would need
      thousands of steps at lr 1e-2 to travel from 1 to a 25x outlier's scale.
    * Unless ``clip``, α stays large enough that ``x/α`` is clipped no more than the calibrated
      quantizer clips ``x``: the sample misses the rare extremes, and clipping them costs most.
    * ``out_weights`` [C_out] weights each output channel's squared error (Fisher information).
    * Minibatch steps are noisy: the α returned is the best of the evaluations on all of ``x``
      every ``EVAL_EVERY`` steps.
    """
    x, weight = x.float(), weight.float()
    spec = act.spec
    s, z = act.scale.float(), act.zero_point.float()
    ref = x @ weight.T
    gain = torch.ones(weight.shape[0]) if out_weights is None else out_weights.float()

    def error(log_alpha: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        alpha = log_alpha.exp()
        xs, ys = (x, ref) if rows is None else (x[rows], ref[rows])
        xq = fake_quantize(xs / alpha, s, z, spec.qmin, spec.qmax)
        wq = _quantize_weight(weight * alpha, wfq)
        return ((ys - xq @ wq.T).pow(2) * gain).mean()

    span = _log_span(channel_range, s, z, spec)
    floor = None if clip else span
    with torch.no_grad():
        starts = [(float(error(t * span)), t * span) for t in INIT_POWERS]
    before = starts[0][0]
    best, best_log = min(starts, key=lambda item: item[0])
    log_alpha = best_log.clone().requires_grad_(True)
    opt = torch.optim.Adam([log_alpha], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    for step in range(1, steps + 1):
        rows = torch.randint(0, x.shape[0], (min(batch_size, x.shape[0]),), generator=generator)
        opt.zero_grad(set_to_none=True)
        loss = error(log_alpha, rows)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            log_alpha.clamp_(*LOG_ALPHA_RANGE)
            if floor is not None:
                log_alpha.copy_(torch.maximum(log_alpha, floor))
        if step % EVAL_EVERY == 0 or step == steps:
            with torch.no_grad():
                current = float(error(log_alpha))
            if current < best:
                best, best_log = current, log_alpha.detach().clone()
    return best_log.exp(), before, best


def _log_span(
    channel_range: tuple[torch.Tensor, torch.Tensor], s: torch.Tensor, z: torch.Tensor, spec
) -> torch.Tensor:
    """log of the α_c (at most 1, at least the lower end of LOG_ALPHA_RANGE) for which
    α_c·[s(qmin − z), s(qmax − z)] just holds channel c's calibration range."""
    lo, hi = (t.float() for t in channel_range)
    top, bottom = s * (spec.qmax - z), s * (spec.qmin - z)
    need = torch.where(hi > 0, hi / top.clamp_min(SCALE_EPS), torch.zeros_like(hi))
    if float(bottom) < 0:
        need = torch.maximum(need, torch.where(lo < 0, lo / bottom, torch.zeros_like(lo)))
    return need.clamp(math.exp(LOG_ALPHA_RANGE[0]), 1.0).log()


@register_pass
class ScaleBottleneckOutliers(HyqPass):
    """Learn per-input-channel scales α of 1x1 convs and fold them (HyQ outlier scaling)."""

    name = "scale_bottleneck_outliers"

    def __init__(
        self,
        ctx=None,
        *,
        ops: tuple[str, ...] | list[str] = ("conv2d",),
        placement: str = "auto",
        steps: int = 300,
        lr: float = 1e-2,
        samples: int = 4096,
        batch_size: int = 256,
        min_gain: float = 0.01,
        clip: bool = False,
        weighting: str = "fisher",
        min_bits: int | None = None,
        max_bits: int | None = None,
    ) -> None:
        super().__init__(ctx)
        self.min_bits = check_bits_option(self.name, "min_bits", min_bits)
        self.max_bits = check_bits_option(self.name, "max_bits", max_bits)
        unknown = sorted(set(ops) - set(OPS))
        if unknown:
            raise PassError(
                f"scale_bottleneck_outliers: unknown op(s) {unknown}; use {sorted(OPS)}"
            )
        if placement not in PLACEMENTS:
            raise PassError(
                f"scale_bottleneck_outliers: placement={placement!r} is unknown; use one of "
                f"{PLACEMENTS} ('auto' folds where exact, else uses a per-channel quantizer)"
            )
        for what, value in (("steps", steps), ("samples", samples), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < (0 if what == "steps" else 1):
                raise PassError(f"scale_bottleneck_outliers: {what} must be a positive int")
        if not 0.0 <= min_gain < 1.0:
            raise PassError("scale_bottleneck_outliers: min_gain is a fraction in [0, 1)")
        self.targets = {OPS[o] for o in ops}
        self.placement = placement
        self.steps, self.lr, self.samples = steps, float(lr), samples
        self.batch_size, self.min_gain = batch_size, float(min_gain)
        self.clip = bool(clip)
        if weighting not in WEIGHTINGS:
            raise PassError(
                f"scale_bottleneck_outliers: weighting={weighting!r} is unknown; use one of "
                f"{WEIGHTINGS}"
            )
        self.weighting = weighting

    # ---------------------------------------------------------------- finding the layers

    def _candidates(self, gm: fx.GraphModule) -> tuple[list[_Candidate], list[str]]:
        found, skipped = [], []
        for m in match_all(gm, CONSUMER):
            op = m["op"]
            if op.target not in self.targets or "hyq_quant" not in op.meta:
                continue
            act, wfq_node = op.args[0], op.args[1]
            act_fq, wfq = quantizer_of(gm, act), quantizer_of(gm, wfq_node)
            if act_fq is None or wfq is None or wfq_node.args[0].op != "get_attr":
                continue
            weight = get_tensor(gm, wfq_node.args[0])
            if op.target is aten.conv2d.default and (
                tuple(weight.shape[2:]) != (1, 1) or (arg(op, 6, "groups") or 1) != 1
            ):
                continue  # not a pointwise conv
            where = f"{op.name} ({op.meta.get('hyq_module_path', '?')})"
            if not (act_fq.calibrated and wfq.calibrated):
                raise PassError(
                    f"scale_bottleneck_outliers: the quantizers of {where} are not calibrated; "
                    "run insert_quantizers and calibrate before this pass"
                )
            if act_fq.spec.per_channel:
                skipped.append(f"{where}: activation quantizer already per-channel")
                continue
            if wfq.spec.per_channel and wfq.spec.axis % weight.dim() != 0:
                skipped.append(f"{where}: weight quantizer is per-channel along the input axis")
                continue
            if len(act.users) != 1 or len(wfq_node.users) != 1 or len(wfq_node.args[0].users) != 1:
                skipped.append(f"{where}: its quantizer or weight is shared with another op")
                continue
            axis = 1 if op.target is aten.conv2d.default else -1
            found.append(_Candidate(op, act, act.args[0], wfq_node.args[0], wfq_node, axis))
        return found, skipped

    def _foldable_chain(self, gm: fx.GraphModule, cand: _Candidate) -> list[fx.Node] | None:
        """producer … x when x is a single-use per-channel affine output behind moves."""
        chain, node = [], cand.x
        while True:
            if not isinstance(node, fx.Node) or len(node.users) != 1:
                return None
            chain.append(node)
            if node.op == "call_function" and node.target in MOVES_VALUES:
                node = node.args[0]
                continue
            break
        producer = chain[-1]
        if producer.op != "call_function" or producer.target not in AFFINE:
            return None
        _, w_index, b_index = AFFINE[producer.target]
        if producer.target is aten.layer_norm.default and len(producer.args[1]) != 1:
            return None  # normalises over several trailing dims: no single channel axis
        if producer.target is aten.batch_norm.default and arg(producer, 5, "training"):
            return None  # training-mode batch norm
        for index, name in ((w_index, "weight"), (b_index, "bias")):
            if _param_source(gm, arg(producer, index, name)) is False:
                return None
        return list(reversed(chain))

    def _channel_maps(self, gm: fx.GraphModule, cands: list[_Candidate]) -> None:
        """Find which producer channel each consumer input channel reads, by running channel
        ids (c + 1 in every element of channel c) from each producer to its consumer."""
        probes = {c.chain[0].name: c for c in cands if c.chain}
        if not probes:
            return
        by_x = {c.x.name: c for c in probes.values()}
        seen: dict[str, torch.Tensor] = {}

        class _Probe(fx.Interpreter):
            def run_node(self, n: fx.Node):
                out = super().run_node(n)
                if n.name in probes and isinstance(out, torch.Tensor):
                    axis = AFFINE[n.target][0] % out.dim()
                    shape = [1] * out.dim()
                    shape[axis] = -1
                    ids = torch.arange(1, out.shape[axis] + 1, dtype=out.dtype).reshape(shape)
                    out = ids.expand_as(out).clone()
                if n.name in by_x:
                    seen[n.name] = out
                return out

        with torch.no_grad(), quantizers_mode(gm, "off"):
            _Probe(gm).run(self.ctx.calib_batches[0][:2])
        for c in probes.values():
            ids = seen.get(c.x.name)
            n_in = c.x.meta["val"].shape[c.axis] if "val" in c.x.meta else None
            if ids is None:
                c.chain = None
                continue
            rows = ids.movedim(c.axis % ids.dim(), 0).reshape(ids.shape[c.axis], -1)
            n_out = rows.shape[0]
            n_prod = c.chain[0].meta["val"].shape[AFFINE[c.chain[0].target][0]]
            perm = rows[:, 0].round().long() - 1
            ok = (
                bool((rows.amax(1) == rows.amin(1)).all())
                and int(n_prod) == n_out
                and (n_in is None or int(n_in) == n_out)
                and bool((perm >= 0).all())
                and perm.unique().numel() == n_out
            )
            c.perm = perm if ok else None
            if not ok:
                c.chain = None

    # ---------------------------------------------------------------- calibration data

    def _record(self, gm: fx.GraphModule, cands: list[_Candidate]) -> dict[str, tuple]:
        """Per candidate: up to ``samples`` input vectors [N, C_in], sampled from the float graph
        on the calibration batches, and each channel's minimum and maximum over all of them."""
        wanted = {c.x.name: c for c in cands}
        per_batch = max(1, math.ceil(self.samples / len(self.ctx.calib_batches)))
        gen = torch.Generator().manual_seed(self.ctx.seed)
        rows: dict[str, list[torch.Tensor]] = {name: [] for name in wanted}
        lo: dict[str, torch.Tensor] = {}
        hi: dict[str, torch.Tensor] = {}

        class _Recorder(fx.Interpreter):
            def run_node(self, n: fx.Node):
                out = super().run_node(n)
                if n.name in wanted:
                    c = wanted[n.name]
                    flat = (
                        out.detach().movedim(c.axis % out.dim(), -1).reshape(-1, out.shape[c.axis])
                    )
                    idx = torch.randperm(flat.shape[0], generator=gen)[:per_batch]
                    rows[n.name].append(flat[idx].clone())
                    mn, mx = flat.amin(0), flat.amax(0)
                    lo[n.name] = torch.minimum(lo[n.name], mn) if n.name in lo else mn
                    hi[n.name] = torch.maximum(hi[n.name], mx) if n.name in hi else mx
                return out

        with torch.no_grad(), quantizers_mode(gm, "off"):
            for batch in self.ctx.calib_batches:
                _Recorder(gm).run(batch)
        return {
            name: (torch.cat(r)[: self.samples], lo[name], hi[name]) for name, r in rows.items()
        }

    def _fisher(self, gm: fx.GraphModule, cands: list[_Candidate]) -> dict[str, torch.Tensor]:
        """Per candidate, ``E[(∂L/∂y_o)²]`` for each output channel ``o`` (diagonal Fisher, as in
        BRECQ), normalised to mean 1. ``L`` is the cross-entropy of the float model's logits
        against its own top-1 class (no labels needed), or ``‖out‖²/2`` for other outputs."""
        wanted = {c.op.name: c for c in cands}
        acc: dict[str, torch.Tensor] = {}
        seen: dict[str, torch.Tensor] = {}

        class _Keep(fx.Interpreter):
            def run_node(self, n: fx.Node):
                out = super().run_node(n)
                if n.name in wanted:
                    seen[n.name] = out
                return out

        with torch.enable_grad(), quantizers_mode(gm, "off"):
            for batch in self.ctx.calib_batches[:FISHER_BATCHES]:
                seen.clear()
                out = _Keep(gm).run(batch.detach().clone().requires_grad_(True))
                out = out[0] if isinstance(out, (tuple, list)) else out
                if out.dim() == 2:
                    loss = torch.nn.functional.cross_entropy(
                        out, out.argmax(-1).detach(), reduction="sum"
                    )
                else:
                    loss = out.pow(2).sum() / 2
                names = [n for n in seen if seen[n].requires_grad]
                grads = torch.autograd.grad(loss, [seen[n] for n in names], allow_unused=True)
                for name, g in zip(names, grads, strict=True):
                    if g is None:
                        continue
                    axis = wanted[name].axis % g.dim()
                    sq = g.detach().pow(2).movedim(axis, 0).reshape(g.shape[axis], -1).mean(1)
                    acc[name] = acc[name] + sq if name in acc else sq
        weights = {}
        for name, total in acc.items():
            mean = total.mean()
            if torch.isfinite(mean) and mean > 0:
                weights[name] = (total / mean).clamp_min(1e-3)
        return weights

    # ---------------------------------------------------------------- rewriting

    def _fold(self, gm: fx.GraphModule, cand: _Candidate, alpha: torch.Tensor) -> None:
        producer = cand.chain[0]
        inv = torch.empty_like(alpha)
        inv[cand.perm] = 1.0 / alpha  # producer channel perm[c] feeds consumer channel c
        _, w_index, b_index = AFFINE[producer.target]
        for index in (w_index, b_index):
            _scale_param(gm, producer, index, inv, is_weight=index == w_index)

    def _per_channel_quantizer(self, gm: fx.GraphModule, cand: _Candidate, alpha) -> None:
        old = quantizer_of(gm, cand.act)
        spec = old.spec.replace(per_channel=True, axis=cand.axis)
        new = FakeQuantizer(spec, old.observer_name, old.role)
        new.set_qparams(old.scale * alpha, old.zero_point.expand(alpha.numel()))
        new.mode = "quantize"
        _set_module(gm, cand.act.target, new)
        shape = [1] * get_tensor(gm, cand.wfq.args[0]).dim()
        shape[1] = -1
        inv = add_constant(gm, f"{cand.op.name}_inv_alpha", (1.0 / alpha).reshape(shape), cand.op)
        with gm.graph.inserting_before(cand.op):
            mul = gm.graph.call_function(aten.mul.Tensor, (cand.wfq, inv))
        mul.meta.update({k: v for k, v in cand.wfq.meta.items() if k.startswith("hyq_module")})
        cand.op.replace_input_with(cand.wfq, mul)

    def _scale_weight(self, gm: fx.GraphModule, cand: _Candidate, alpha: torch.Tensor) -> None:
        w = get_tensor(gm, cand.weight).detach()
        shape = [1] * w.dim()
        shape[1] = -1
        new_w = w * alpha.reshape(shape).to(w.dtype)
        node = add_constant(gm, f"{cand.weight.target}_alpha", new_w, cand.wfq)
        cand.wfq.replace_input_with(cand.weight, node)
        _set_module(gm, cand.wfq.target, _recalibrated(quantizer_of(gm, cand.wfq), new_w))

    def requires(self, gm: fx.GraphModule) -> None:
        if not self.ctx.calib_batches:
            raise PassError(
                "scale_bottleneck_outliers: no calibration data; it learns α on calibration "
                "activations (pass calibration images to hyq_fx.quantize)"
            )
        if not quantizers(gm):
            raise PassError(
                "scale_bottleneck_outliers: the graph has no quantizers; run insert_quantizers "
                "and calibrate before this pass"
            )

    def call(self, gm: fx.GraphModule) -> PassResult:
        bits = self.ctx.a_bits
        if (self.min_bits is not None and bits < self.min_bits) or (
            self.max_bits is not None and bits > self.max_bits
        ):
            why = f"a_bits {bits} outside [{self.min_bits}, {self.max_bits}]"
            self.ctx.log.append({"pass": self.name, "skipped": why})
            return PassResult(gm, False)
        cands, skipped = self._candidates(gm)
        stats: dict[str, Any] = {"folded": [], "per_channel_quantizer": [], "unchanged": []}
        stats["skipped"] = skipped
        if not cands:
            self.ctx.log.append({"pass": self.name, **stats})
            return PassResult(gm, False)
        if self.placement != "quantizer":
            for c in cands:
                c.chain = self._foldable_chain(gm, c)
            self._channel_maps(gm, cands)
        samples = self._record(gm, cands)
        fisher = self._fisher(gm, cands) if self.weighting == "fisher" else {}
        gen = torch.Generator().manual_seed(self.ctx.seed)
        modified = False
        for c in cands:
            start = time.perf_counter()
            where = f"{c.op.name} ({c.op.meta.get('hyq_module_path', '?')})"
            if self.placement == "fold" and c.chain is None:
                stats["unchanged"].append(f"{where}: cannot fold (placement='fold')")
                continue
            c.weight = c.wfq.args[0]  # an earlier fold may have replaced it
            w = get_tensor(gm, c.weight).detach()
            x, lo, hi = samples[c.x.name]
            alpha, before, after = learn_alpha(
                x,
                w.reshape(w.shape[0], w.shape[1]),
                quantizer_of(gm, c.act),
                quantizer_of(gm, c.wfq),
                (lo, hi),
                steps=self.steps,
                lr=self.lr,
                batch_size=self.batch_size,
                generator=gen,
                clip=self.clip,
                out_weights=fisher.get(c.op.name),
            )
            entry = {
                "node": c.op.name,
                "module": c.op.meta.get("hyq_module_path", "?"),
                "mse_before": before,
                "mse_after": after,
                "seconds": round(time.perf_counter() - start, 2),
            }
            if not (after < before * (1.0 - self.min_gain)) or not torch.isfinite(alpha).all():
                stats["unchanged"].append(entry)
                continue
            if c.chain is not None and self._foldable_chain(gm, c) is None:
                # an earlier candidate rewrote this producer's weight: with a per-channel
                # quantizer it is now fq(w·α)·α⁻¹, computed, not a constant to scale
                c.chain = None
                if self.placement == "fold":
                    stats["unchanged"].append(f"{where}: cannot fold after earlier rewrites")
                    continue
            self._scale_weight(gm, c, alpha)
            if c.chain is not None:
                self._fold(gm, c, alpha)
                entry["producer"] = c.chain[0].name
                stats["folded"].append(entry)
                mode = "folded"
            else:
                self._per_channel_quantizer(gm, c, alpha)
                stats["per_channel_quantizer"].append(entry)
                mode = "per_channel_quantizer"
            c.op.meta["hyq_outlier_scale"] = {"placement": mode, "alpha": alpha.tolist()}
            modified = True
        self.ctx.log.append({"pass": self.name, **stats})
        if modified:
            _drop_replaced_constants(gm)
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> None:
        for name, fq in quantizers(gm).items():
            if not fq.calibrated:
                raise PassError(f"scale_bottleneck_outliers left quantizer '{name}' uncalibrated")


def _param_source(gm: fx.GraphModule, value: Any) -> tuple[fx.Node, fx.Node | None] | None | bool:
    """(get_attr, its FakeQuantizer or None) behind a weight/bias argument ``value``; None for a
    missing argument; False when it is something that cannot be rescaled (computed, or shared)."""
    if value is None:
        return None
    if not isinstance(value, fx.Node):
        return False
    if value.op == "get_attr":
        return (value, None) if len(value.users) == 1 else False
    fq = quantizer_of(gm, value)
    if fq is not None and value.args[0].op == "get_attr" and len(value.users) == 1:
        return (value.args[0], value) if len(value.args[0].users) == 1 else False
    return False


def _scale_param(
    gm: fx.GraphModule, producer: fx.Node, index: int, factor: torch.Tensor, *, is_weight: bool
) -> None:
    """Multiply the producer's per-output-channel parameter ``args[index]`` by ``factor``."""
    src = _param_source(gm, arg(producer, index, "weight" if is_weight else "bias"))
    if src is None:
        if not is_weight:
            return  # no bias: 0 · factor = 0
        # a norm without affine weight: make one
        args = list(producer.args) + [None] * max(0, index + 1 - len(producer.args))
        args[index] = add_constant(gm, f"{producer.name}_alpha_weight", factor.clone(), producer)
        producer.args = tuple(args)
        return
    node, fq_node = src
    t = get_tensor(gm, node).detach()
    shape = [1] * t.dim()
    shape[0] = -1
    new_t = t * factor.reshape(shape).to(t.dtype)
    user = fq_node if fq_node is not None else producer
    new_node = add_constant(gm, f"{node.target}_alpha", new_t, user)
    user.replace_input_with(node, new_node)
    if fq_node is not None:
        _set_module(gm, fq_node.target, _recalibrated(quantizer_of(gm, fq_node), new_t))


def _drop_replaced_constants(gm: fx.GraphModule) -> None:
    """Remove the get_attr nodes left without users and the tensors only they read.

    (``pass_base.prune_unused_attributes`` would also drop the quantizers' own ``scale`` and
    ``zero_point`` buffers, which no get_attr node reads, so it cannot run after quantizers
    are inserted.)
    """
    dead = [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]
    for node in dead:
        gm.graph.erase_node(node)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for node in dead:
        if node.target in used:
            continue
        owner, attr = owner_of(gm, node.target)
        if isinstance(owner, FakeQuantizer):
            continue
        owner._parameters.pop(attr, None)
        owner._buffers.pop(attr, None)
