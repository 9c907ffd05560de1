"""quantize_norms: quantize the inputs and outputs of LayerNorm / GroupNorm ("full" mode).

For each normalisation ``y = norm(x)`` (aten.layer_norm, aten.group_norm; LayerNorm2d and
GroupNorm(1, C) are these ops in the captured graph)::

    y = Q_out(norm(Q_in(x))),   Q(t) = (clamp(round(t/s) + z, qmin, qmax) − z) · s

so the norm reads integer inputs and hands on integer outputs, as an integer-only pipeline (HyQ's
fully quantized W8A8, Kim, Lee & Kim, IJCAI 2024; FQ-ViT, Lin et al., IJCAI 2022) runs it; the
normalisation arithmetic itself stays in float. Only the norm reads ``Q_in(x)``: a residual
branch that also reads ``x`` keeps it. ``Q_out`` is not added where the output already reaches
only quantizers (directly or through reshapes / permutes), e.g. the qkv linear's input
quantizer. The new quantizers observe: run ``calibrate`` next.
Invariant checked by the test: before calibration the graph computes what it computed before.
"""

from __future__ import annotations

import torch
from torch import fx

from hyq_fx.pass_base import HyqPass, PassError, PassResult, add_module_call, register_pass
from hyq_fx.quantizer import FakeQuantizer
from hyq_fx.spec import QuantSpec
from hyq_fx.vocabulary import RESHAPES_AND_COPIES, is_quantizer

aten = torch.ops.aten

OPS = {"layer_norm": aten.layer_norm.default, "group_norm": aten.group_norm.default}


def _reaches_only_quantizers(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether every path from ``node`` ends in a quantizer, through reshapes / copies only."""
    if not node.users:
        return False
    for user in node.users:
        if is_quantizer(gm, user):
            continue
        if user.op == "call_function" and user.target in RESHAPES_AND_COPIES:
            if _reaches_only_quantizers(gm, user):
                continue
        return False
    return True


@register_pass
class QuantizeNorms(HyqPass):
    """Insert observing quantizers on the inputs and outputs of layer_norm / group_norm."""

    name = "quantize_norms"

    def __init__(
        self,
        ctx=None,
        *,
        ops: tuple[str, ...] | list[str] = ("layer_norm", "group_norm"),
        bits: int | None = None,
        symmetric: bool = False,
        observer: str = "minmax",
        inputs: bool = True,
        outputs: bool = True,
    ) -> None:
        super().__init__(ctx)
        unknown = sorted(set(ops) - set(OPS))
        if unknown:
            raise PassError(f"quantize_norms: unknown op(s) {unknown}; use {sorted(OPS)}")
        self.targets = {OPS[o] for o in ops}
        try:
            self.spec = QuantSpec(
                bits=self.ctx.a_bits if bits is None else bits, symmetric=symmetric
            )
            FakeQuantizer(self.spec, observer)  # validates the observer name
        except ValueError as exc:
            raise PassError(f"quantize_norms: {exc}") from None
        self.observer = observer
        self.inputs, self.outputs = bool(inputs), bool(outputs)

    def _new(self, gm: fx.GraphModule, hint: str, src: fx.Node) -> fx.Node:
        return add_module_call(
            gm, hint, FakeQuantizer(self.spec, self.observer, "activation"), src, after=src
        )

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        cache: dict[fx.Node, fx.Node] = {}
        for norm in list(gm.graph.nodes):
            if norm.op != "call_function" or norm.target not in self.targets:
                continue
            src = norm.args[0]
            if self.inputs and isinstance(src, fx.Node) and not is_quantizer(gm, src):
                if src not in cache:
                    cache[src] = self._new(gm, f"fq_{norm.name}_in", src)
                norm.replace_input_with(src, cache[src])
                modified = True
            if self.outputs and not _reaches_only_quantizers(gm, norm):
                fq = self._new(gm, f"fq_{norm.name}_out", norm)
                norm.replace_all_uses_with(fq, delete_user_cb=lambda user, fq=fq: user is not fq)
                modified = True
            norm.meta["hyq_norm_quantized"] = True
        return PassResult(gm, modified)
