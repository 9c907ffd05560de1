"""reparameterize_norm_scales: move per-channel ranges of a norm's output into its affine.

Post-norm activations (LayerNorm over channels, GroupNorm, timm's LayerNorm2d) have channel
ranges that differ a lot, which a per-tensor quantizer handles badly. Scale reparameterization
(Li et al., ICCV 2023, "RepQ-ViT: Scale Reparameterization for Post-Training Quantization of
Vision Transformers", §4.2) calibrates the norm output ``y`` per channel (range ``[m_c, M_c]``)
and rewrites, exactly in floating point::

    R_c = M_c − m_c,   r_c = R_c / mean(R),   t = mean(m / r),   b_c = m_c − r_c·t
    y'  = (y − b) / r                       (every channel now spans [t, t + mean(R)])
    norm:      γ' = γ / r,   β' = (β − b) / r          (per channel of the norm's affine)
    consumer:  W' = W · r   (along its input channels),   bias' = bias + W · b

so ``W'·y' + bias' = W·y + bias`` and one per-tensor quantizer on ``y'`` suffices. With the
quantizer's scale ``s_c = R_c/(2^k − 1)`` this is the paper's ``r = s/mean(s)``,
``t = −mean(z)·mean(s)``. A norm without affine gets one (as constants). Option ``strength``
``α ∈ [0, 1]`` uses ``r_c = R_c^α / mean(R^α)``: 1 is RepQ-ViT, 0 keeps the weights and only
aligns the channel offsets (every channel then starts at ``t``).

Consumers that can absorb ``(r, b)``: ``linear``, and ``conv2d`` with zero padding (any kernel,
stride or groups; MobileViT v2's 1x1 convs, EdgeNeXt's 2x2 downsampling), reached directly or
through ops that only move values (reshape, permute, transpose, flatten, col2im, ...). The
channel axis along such a chain is not guessed from shapes: a tensor holding each channel's
index is pushed through the chain on a calibration batch, and the consumer must see exactly
that index along its input-channel axis. A norm with any other user (residual add, a padded
conv, the graph output) is left as it is and counted in ``ctx.log``.

Runs on the float graph, before ``insert_quantizers``. Invariants checked by the test: outputs
equal the original graph within 1e-5 (relative); the channel ranges of the norm outputs become
uniform and the error a per-tensor quantizer of them causes at the consumers drops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from hyq_fx.observers import OBSERVERS, make_observer
from hyq_fx.pass_base import (
    HyqPass,
    PassError,
    PassResult,
    add_constant,
    get_tensor,
    prune_unused_attributes,
    quantizers,
    register_pass,
)
from hyq_fx.patterns import is_const, is_op, match, wildcard
from hyq_fx.spec import QuantSpec
from hyq_fx.vocabulary import MOVES_OR_EXPANDS_VALUES, SIZE_QUERIES, arg

aten = torch.ops.aten

NORM = is_op(aten.layer_norm.default, aten.group_norm.default)(wildcard(), ...).named("norm")
LINEAR = is_op(aten.linear.default)(wildcard(), is_const(), ...).named("consumer")
CONV = is_op(aten.conv2d.default)(wildcard(), is_const(), ...).named("consumer")

RANGE_FLOOR = 1e-6  # a channel's range is at least this fraction of the widest one


@dataclass
class _Site:
    """A norm whose output can be reparameterized, and the path to its consumers."""

    norm: fx.Node
    axis: int
    chain: list[fx.Node] = field(default_factory=list)
    consumers: list[fx.Node] = field(default_factory=list)


def _only_data_input(user: fx.Node, src: fx.Node) -> bool:
    """``src`` is ``user``'s first argument and appears nowhere else in its arguments."""
    others: list[fx.Node] = []
    fx.node.map_arg((user.args[1:], user.kwargs), others.append)
    return bool(user.args) and user.args[0] is src and src not in others


def _conv_absorbs(conv: fx.Node) -> str | None:
    """Why a conv2d cannot absorb a per-input-channel affine (None if it can)."""
    padding = arg(conv, 4, "padding", [0, 0])
    padding = [padding] if isinstance(padding, int) else list(padding)
    if any(p != 0 for p in padding):
        return f"{conv.name} pads its input (padding={padding}): the shift b would not be zero"
    return None


def _channel_axis(norm: fx.Node) -> int | str:
    """The channel axis of a norm's output, or why the norm is not supported."""
    if norm.target is aten.group_norm.default:
        return 1
    shape = arg(norm, 1, "normalized_shape")
    if not isinstance(shape, (list, tuple)) or len(shape) != 1:
        return f"layer_norm over {shape} (several dims): its affine is not per channel"
    return -1


def _channel_tag(like: torch.Tensor, axis: int) -> torch.Tensor:
    """A tensor shaped and strided like ``like`` whose value is (channel index + 1)."""
    axis %= like.dim()
    view = [1] * like.dim()
    view[axis] = like.shape[axis]
    index = torch.arange(1, like.shape[axis] + 1, dtype=torch.float32).reshape(view)
    tag = torch.empty_strided(like.shape, like.stride(), dtype=torch.float32)
    return tag.copy_(index.expand(like.shape))


class _Probe(fx.Interpreter):
    """Runs the float graph: feeds norm outputs to per-channel observers and, when ``tags`` is
    set, pushes channel-index tags from each norm along its value-moving chain."""

    def __init__(self, gm: fx.GraphModule, sites: list[_Site], observers: dict, tags: bool):
        super().__init__(gm)
        self.by_norm = {s.norm: s for s in sites}
        self.chain = {n for s in sites for n in s.chain}
        self.observers = observers
        self.tags: dict[fx.Node, torch.Tensor] | None = {} if tags else None

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.by_norm:
            self.observers[n].observe(out)
            if self.tags is not None:
                self.tags[n] = _channel_tag(out, self.by_norm[n].axis)
        elif self.tags is not None and n in self.chain:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.tags[n] = n.target(self.tags[n.args[0]], *args[1:], **kwargs)
        return out


@register_pass
class ReparameterizeNormScales(HyqPass):
    """Equalise per-channel ranges of post-norm activations via the norm affine (exact)."""

    name = "reparameterize_norm_scales"

    def __init__(
        self,
        ctx=None,
        *,
        observer: str = "minmax",
        strength: float = 1.0,
        batches: int | None = None,
    ) -> None:
        super().__init__(ctx)
        if not 0.0 <= strength <= 1.0:
            raise PassError(
                f"reparameterize_norm_scales: strength={strength} must be in [0, 1] (1 equalises "
                "the channel ranges as RepQ-ViT does, 0 only aligns the channel offsets)"
            )
        if observer not in OBSERVERS:
            raise PassError(
                f"reparameterize_norm_scales: unknown observer {observer!r}; "
                f"use one of {sorted(OBSERVERS)}"
            )
        if batches is not None and batches < 1:
            raise PassError(f"reparameterize_norm_scales: batches={batches} must be >= 1 or null")
        self.observer = observer
        self.strength = float(strength)
        self.batches = batches
        self.skipped: dict[str, str] = {}
        self.done: list[str] = []
        self._created: list[str] = []

    def requires(self, gm: fx.GraphModule) -> None:
        found = quantizers(gm)
        if found:
            raise PassError(
                f"reparameterize_norm_scales: the graph already has quantizers ({next(iter(found))}"
                ", ...); it rewrites float weights and calibrates the float graph, so put it "
                "before insert_quantizers in the recipe"
            )
        if not self.ctx.calib_batches:
            raise PassError(
                "reparameterize_norm_scales: no calibration data; it measures the per-channel "
                "ranges of norm outputs on the calibration images"
            )

    # ------------------------------------------------------------------ finding the sites

    def _site(self, norm: fx.Node) -> _Site | str:
        axis = _channel_axis(norm)
        if isinstance(axis, str):
            return axis
        for index, name in ((2, "weight"), (3, "bias")):
            value = arg(norm, index, name)
            if value is not None and not (isinstance(value, fx.Node) and value.op == "get_attr"):
                return f"its {name} is computed in the graph, not a constant"
        site = _Site(norm, axis)
        frontier = [norm]
        while frontier:
            src = frontier.pop()
            for user in src.users:
                if user.op == "call_function" and user.target in SIZE_QUERIES:
                    continue
                if not _only_data_input(user, src):
                    return f"{user.name} ({user.target}) reads it other than as its data input"
                # a per-channel affine commutes with ops that only move, copy or expand values
                # as long as the channel survives as one axis, which the index-tag probe checks
                if user.op == "call_function" and user.target in MOVES_OR_EXPANDS_VALUES:
                    if user not in site.chain:
                        site.chain.append(user)
                        frontier.append(user)
                    continue
                if match(LINEAR, user) is not None:
                    site.consumers.append(user)
                    continue
                if match(CONV, user) is not None:
                    if (why := _conv_absorbs(user)) is not None:
                        return why
                    site.consumers.append(user)
                    continue
                return f"it feeds {user.name} ({user.target}), which cannot absorb a channel affine"
        if not site.consumers:
            return "it feeds no linear/conv2d"
        return site

    def _check_tags(self, site: _Site, tags: dict[fx.Node, torch.Tensor]) -> str | None:
        for consumer in site.consumers:
            seen = tags[consumer.args[0]]
            axis = -1 if consumer.target is aten.linear.default else 1
            expected = _channel_tag(seen, axis)
            if not torch.equal(seen, expected):
                return (
                    f"its channels do not arrive intact on {consumer.name}'s input-channel axis "
                    "(the path mixes or reorders channels)"
                )
        return None

    # ------------------------------------------------------------------ the rewrite

    def _const(self, gm: fx.GraphModule, hint: str, value: torch.Tensor, before: fx.Node):
        node = add_constant(gm, hint, value, before)
        self._created.append(node.target)
        return node

    def _rewrite(self, gm: fx.GraphModule, site: _Site, lo: torch.Tensor, hi: torch.Tensor):
        norm = site.norm
        span = (hi - lo).double()
        span = span.clamp_min(span.max() * RANGE_FLOOR)
        r = span**self.strength / (span**self.strength).mean()
        t = (lo.double() / r).mean()
        b = lo.double() - r * t
        channels = r.numel()
        weight, bias = arg(norm, 2, "weight"), arg(norm, 3, "bias")
        ref = get_tensor(gm, weight) if weight is not None else None
        dtype = ref.dtype if ref is not None else torch.float32
        gamma = ref.double() if ref is not None else torch.ones(channels, dtype=torch.float64)
        beta = (
            get_tensor(gm, bias).double()
            if bias is not None
            else torch.zeros(channels, dtype=torch.float64)
        )
        hint = norm.meta.get("hyq_module_path", norm.name) or norm.name
        args = list(norm.args) + [None] * max(0, 4 - len(norm.args))
        args[2] = self._const(gm, f"{hint}_weight_reparam", (gamma / r).to(dtype), norm)
        args[3] = self._const(gm, f"{hint}_bias_reparam", ((beta - b) / r).to(dtype), norm)
        norm.args = tuple(args)
        norm.kwargs = {k: v for k, v in norm.kwargs.items() if k not in ("weight", "bias")}
        for consumer in site.consumers:
            w = get_tensor(gm, consumer.args[1]).detach()
            w64 = w.double()
            if consumer.target is aten.linear.default:
                scale, shift = r.reshape(1, -1), b.reshape(1, -1)
            else:  # conv2d: input channel c of group g sits at column c − g·(C/groups)
                groups = channels // w.shape[1]
                per_out = w.shape[0] // groups
                scale = r.reshape(groups, -1).repeat_interleave(per_out, dim=0)
                shift = b.reshape(groups, -1).repeat_interleave(per_out, dim=0)
                scale = scale.reshape(*scale.shape, *([1] * (w.dim() - 2)))
                shift = shift.reshape(*shift.shape, *([1] * (w.dim() - 2)))
            new_w = w64 * scale
            delta = (w64 * shift).flatten(1).sum(1)
            bias_node = arg(consumer, 2, "bias")
            old_bias = (
                get_tensor(gm, bias_node).double()
                if bias_node is not None
                else torch.zeros(w.shape[0], dtype=torch.float64)
            )
            name = consumer.args[1].target.replace(".", "_")
            cargs = list(consumer.args) + [None] * max(0, 3 - len(consumer.args))
            cargs[1] = self._const(gm, f"{name}_reparam", new_w.to(w.dtype), consumer)
            cargs[2] = self._const(
                gm,
                f"{name.removesuffix('_weight')}_bias_reparam",
                (old_bias + delta).to(w.dtype),
                consumer,
            )
            consumer.args = tuple(cargs)
            consumer.kwargs = {k: v for k, v in consumer.kwargs.items() if k != "bias"}
            consumer.meta["hyq_reparam_from"] = norm.name
        raw = (hi - lo).double()
        norm.meta["hyq_reparam"] = {
            "channels": channels,
            "consumers": [c.name for c in site.consumers],
            "range_ratio_before": float(raw.max() / raw.min().clamp_min(1e-30)),
            "target_range": [float(t), float(t + span.mean())],
        }

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.skipped, self.done, self._created = {}, [], []
        sites: list[_Site] = []
        for node in list(gm.graph.nodes):
            if match(NORM, node) is None:
                continue
            found = self._site(node)
            if isinstance(found, str):
                self.skipped[node.name] = found
            else:
                sites.append(found)
        if sites:
            specs = {
                s.norm: QuantSpec(bits=self.ctx.a_bits, per_channel=True, axis=s.axis)
                for s in sites
            }
            observers = {n: make_observer(self.observer, spec) for n, spec in specs.items()}
            batches = self.ctx.calib_batches[: self.batches]
            with torch.no_grad():
                for i, batch in enumerate(batches):
                    probe = _Probe(gm, sites, observers, tags=i == 0)
                    probe.run(batch)
                    if probe.tags is not None:
                        tags = probe.tags
            for site in sites:
                why = self._check_tags(site, tags)
                if why is not None:
                    self.skipped[site.norm.name] = why
                    continue
                lo, hi = observers[site.norm].range_for(specs[site.norm])
                if not torch.isfinite(lo).all() or not torch.isfinite(hi).all():
                    raise PassError(
                        f"reparameterize_norm_scales: the output of {site.norm.name} "
                        f"({site.norm.meta.get('hyq_module_path', '?')}) is not finite on the "
                        "calibration data; check the input preprocessing"
                    )
                if float((hi - lo).max()) <= 0.0:
                    self.skipped[site.norm.name] = "its output is constant on the calibration data"
                    continue
                self._rewrite(gm, site, lo, hi)
                self.done.append(site.norm.name)
        if self.done:
            prune_unused_attributes(gm)
        self.ctx.log.append(
            {"pass": self.name, "reparameterized": list(self.done), "skipped": dict(self.skipped)}
        )
        return PassResult(gm, bool(self.done))

    def ensures(self, gm: fx.GraphModule) -> None:
        for target in self._created:
            value = getattr(gm, target, None)
            if isinstance(value, torch.Tensor) and not torch.isfinite(value).all():
                raise PassError(
                    f"reparameterize_norm_scales: the rewritten constant {target} is not finite"
                )
