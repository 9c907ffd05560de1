"""insert_quantizers: put a FakeQuantizer on every input and weight of the compute ops.

For each matched op ``y = f(x, W)`` (conv2d, linear, matmul of two activations)::

    y = f(Q_a(x), Q_w(W)),   Q(t) = (clamp(round(t/s) + z, qmin, qmax) − z) · s

Weights get a per-output-channel quantizer by default (axis 0 of conv/linear weights), inputs a
per-tensor one (PTQ baseline of Krishnamoorthi 2018, "Quantizing deep convolutional networks
for efficient inference: A whitepaper"). A tensor feeding several quantized ops with the same
spec shares one activation quantizer, as one QuantizeLinear would at deployment; its other
uses (residuals, norms) stay in float ("partial" quantization).

The quantizers start in observe mode: run ``calibrate`` next. Invariant checked by the test:
before calibration the graph computes exactly what it computed before the pass.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
from torch import fx

from hyq_fx.observers import OBSERVERS
from hyq_fx.pass_base import (
    HyqPass,
    PassError,
    PassResult,
    add_module_call,
    check_bits_option,
    register_pass,
)
from hyq_fx.quantizer import FakeQuantizer
from hyq_fx.spec import QuantSpec

aten = torch.ops.aten

OPS = {
    "conv2d": aten.conv2d.default,
    "linear": aten.linear.default,
    "matmul": aten.matmul.default,
}
WEIGHT_DEFAULT = {"symmetric": True, "per_channel": True, "observer": "minmax"}
ACTIVATION_DEFAULT = {"symmetric": False, "per_channel": False, "observer": "minmax"}
_SPEC_KEYS = {"bits", "symmetric", "per_channel", "scale_type", "observer"}


def _spec(options: dict[str, Any], bits: int, axis: int, what: str) -> tuple[QuantSpec, str]:
    unknown = sorted(set(options) - _SPEC_KEYS)
    if unknown:
        raise PassError(
            f"insert_quantizers: unknown {what} option(s) {unknown}; use {sorted(_SPEC_KEYS)}"
        )
    spec = QuantSpec(
        bits=options.get("bits", bits),
        symmetric=options["symmetric"],
        per_channel=options["per_channel"],
        axis=axis,
        scale_type=options.get("scale_type", "float"),
    )
    if options["observer"] not in OBSERVERS:
        raise PassError(
            f"insert_quantizers: unknown {what} observer {options['observer']!r}; use "
            f"{sorted(OBSERVERS)}"
        )
    return spec, options["observer"]


def _activation_axis(op: fx.Node, index: int) -> int:
    if op.target is aten.conv2d.default:
        return 1
    return -1 if index == 0 else -2


def _is_depthwise(op: fx.Node) -> bool:
    """A conv whose every output channel reads one input channel: its requantization is per
    channel anyway, so a per-channel input scale costs nothing in integer arithmetic."""
    if op.target is not aten.conv2d.default or len(op.args) < 7:
        return False
    weight = op.args[1].meta.get("val") if isinstance(op.args[1], fx.Node) else None
    return weight is not None and weight.shape[1] == 1 and op.args[6] > 1


def _weight_axis(op: fx.Node, index: int) -> int:
    return 0 if op.target in (aten.conv2d.default, aten.linear.default) or index == 0 else -1


@register_pass
class InsertQuantizers(HyqPass):
    """Insert observing FakeQuantizers on the inputs and weights of conv/linear/matmul."""

    name = "insert_quantizers"

    def __init__(
        self,
        ctx=None,
        *,
        ops: tuple[str, ...] | list[str] = ("conv2d", "linear", "matmul"),
        weight: dict[str, Any] | None = None,
        activation: dict[str, Any] | None = None,
        skip: tuple[str, ...] | list[str] = (),
        depthwise_per_channel: bool = False,
        depthwise_per_channel_max_bits: int | None = None,
    ) -> None:
        super().__init__(ctx)
        if isinstance(ops, str):
            raise PassError(f"insert_quantizers: 'ops' must be a list of op names, got {ops!r}")
        unknown = sorted(set(ops) - set(OPS))
        if unknown:
            raise PassError(f"insert_quantizers: unknown op(s) {unknown}; use {sorted(OPS)}")
        self.targets = {OPS[o] for o in ops}
        self.weight = {**WEIGHT_DEFAULT, **(weight or {})}
        self.activation = {**ACTIVATION_DEFAULT, **(activation or {})}
        self.skip = tuple(skip)
        bits = check_bits_option(
            self.name, "depthwise_per_channel_max_bits", depthwise_per_channel_max_bits
        )
        # per-channel depthwise inputs only up to that activation bit width: at 8 bits they
        # did not change top-1 and cost ONNX Runtime a float Pad/Mul/Add per depthwise conv
        self.depthwise_per_channel = depthwise_per_channel and (
            bits is None or self.ctx.a_bits <= bits
        )
        # validate now, so a bad recipe fails before any work
        _spec(self.weight, self.ctx.w_bits, 0, "weight")
        _spec(self.activation, self.ctx.a_bits, 0, "activation")

    def _skipped(self, node: fx.Node) -> bool:
        path = node.meta.get("hyq_module_path", "")
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(node.name, p) for p in self.skip)

    def _quantizer_for(self, gm, op: fx.Node, index: int, cache: dict) -> fx.Node:
        src = op.args[index]
        is_weight = src.op == "get_attr"
        if is_weight:
            spec, obs = _spec(self.weight, self.ctx.w_bits, _weight_axis(op, index), "weight")
        else:
            axis = _activation_axis(op, index)
            spec, obs = _spec(self.activation, self.ctx.a_bits, axis, "activation")
            if self.depthwise_per_channel and index == 0 and _is_depthwise(op):
                spec = spec.replace(per_channel=True)
        key = (src, spec, obs)
        if key not in cache:
            role = "weight" if is_weight else "activation"
            suffix = "w" if is_weight else f"in{index}"
            fq = FakeQuantizer(spec, obs, role)
            cache[key] = add_module_call(gm, f"fq_{op.name}_{suffix}", fq, src, after=src)
        return cache[key]

    def call(self, gm: fx.GraphModule) -> PassResult:
        cache: dict = {}
        modified = False
        for op in list(gm.graph.nodes):
            if op.op != "call_function" or op.target not in self.targets or self._skipped(op):
                continue
            if "hyq_quant" in op.meta:
                continue  # already quantized by an earlier pass
            record: dict[str, Any] = {"inputs": [], "weight": None, "op": op.target.__name__}
            args = list(op.args)
            for index in (0, 1):  # (input, weight) or the two matmul operands
                src = args[index]
                if not isinstance(src, fx.Node):
                    continue
                fq_node = self._quantizer_for(gm, op, index, cache)
                args[index] = fq_node
                if src.op == "get_attr":
                    record["weight"] = fq_node.target
                else:
                    record["inputs"].append(fq_node.target)
            op.args = tuple(args)
            op.meta["hyq_quant"] = record
            modified = True
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> None:
        for op in gm.graph.nodes:
            record = op.meta.get("hyq_quant")
            if record and op.target in (aten.conv2d.default, aten.linear.default):
                if record["weight"] is None:
                    raise PassError(f"insert_quantizers: {op.name} has a weight left in float")
