"""correct_bias: remove the mean output shift quantization leaves in each conv / linear.

Rounding weights and clipping activations does not only add noise, it moves the mean of a
layer's output, and a shifted mean passes unchanged through every later layer (a residual
stream adds it up). For each quantized conv2d / linear ``y = W·Q_a(x̃) + b`` (``x̃`` its input
in the quantized model) the pass adds the per-output-channel mean error to the bias::

    b_o ← b_o + E[ y_fp − y_q ]_o ,   y_fp = W·x + b (float model),   y_q = Q_w(W)·Q_a(x̃) + b

with the expectation over calibration images and every position (batch, H, W / tokens), so
the corrected layer's output has the float model's mean on those images (Nagel, van Baalen,
Blankevoort & Welling, "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019, §4.2, empirical variant; Finkelstein, Almog & Grobman, "Fighting
Quantization Bias With Bias", 2019). The layers are corrected one at a time in graph order,
each measured on the model with every earlier layer already corrected (a layer measured before
an upstream correction would correct a shift that is no longer there; ``rounds=N`` trades that
exactness for N measurement passes instead of one per layer).

A bias is a float (int32 at deployment) constant, so nothing is added at run time. Like
``reconstruct_blocks`` the pass keeps its corrections only if the model's output KL on
``holdout`` calibration images it did not measure on drops (else every bias is restored).
Invariant checked by the test: each corrected layer's mean output error on the calibration
images is (near) zero, and the logit error drops.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from hyq_fx.pass_base import (
    HyqPass,
    PassError,
    PassResult,
    QuantContext,
    add_constant,
    first_images,
    float_outputs,
    get_tensor,
    holdout_images,
    output_kl,
    prune_unused_attributes,
    register_pass,
)
from hyq_fx.vocabulary import quantizers_mode

aten = torch.ops.aten
BIASED_OPS = (aten.conv2d.default, aten.linear.default)


def _channel_means(
    gm: fx.GraphModule, batches: list[torch.Tensor], ops: list[fx.Node]
) -> dict[fx.Node, torch.Tensor]:
    """Per-output-channel mean of each op's output over ``batches`` (axis 1 for conv, last for
    linear), accumulated as the interpreter goes, so no activation is kept."""
    sums: dict[fx.Node, torch.Tensor] = {}
    counts: dict[fx.Node, int] = {}
    wanted = set(ops)

    class _Means(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n in wanted:
                y = out.detach().double()
                y = y.movedim(1, -1) if n.target is aten.conv2d.default else y
                flat = y.reshape(-1, y.shape[-1])
                sums[n] = sums.get(n, 0) + flat.sum(0)
                counts[n] = counts.get(n, 0) + flat.shape[0]
            return out

    with torch.no_grad():
        for batch in batches:
            _Means(gm).run(batch)
    return {n: sums[n] / counts[n] for n in sums}


@register_pass
class CorrectBias(HyqPass):
    """Add each quantized conv/linear's mean output error to its bias."""

    name = "correct_bias"

    def __init__(
        self,
        ctx: QuantContext | None = None,
        *,
        images: int = 64,
        rounds: int | None = None,
        holdout: int = 128,
    ) -> None:
        super().__init__(ctx)
        if images < 1 or (rounds is not None and rounds < 1) or holdout < 0:
            raise PassError(
                "correct_bias: need images >= 1, rounds >= 1, holdout >= 0 "
                f"(got images={images}, rounds={rounds}, holdout={holdout})"
            )
        self.images, self.rounds, self.holdout = images, rounds, holdout

    def requires(self, gm: fx.GraphModule) -> None:
        if not self.ctx.calib_batches:
            raise PassError(
                "correct_bias: no calibration data; pass calibration images to hyq_fx.quantize"
            )

    def call(self, gm: fx.GraphModule) -> PassResult:
        ops = [
            n
            for n in gm.graph.nodes
            if n.op == "call_function" and n.target in BIASED_OPS and "hyq_quant" in n.meta
        ]
        if not ops:
            return PassResult(gm, False)
        fit = first_images(self.ctx.calib_batches, self.images)
        held_out = holdout_images(self.ctx.calib_batches, self.images, self.holdout)
        reference = float_outputs(gm, held_out) if held_out is not None else None
        before = output_kl(gm, held_out, self.name, reference) if held_out is not None else None

        with quantizers_mode(gm, "off"):
            target = _channel_means(gm, fit, ops)
        original = {op: op.args[2] if len(op.args) > 2 else None for op in ops}
        shifts: dict[str, float] = {}
        size = 1 if self.rounds is None else -(-len(ops) // self.rounds)
        for start in range(0, len(ops), size):
            chunk = ops[start : start + size]
            got = _channel_means(gm, fit, chunk)
            for op in chunk:
                delta = (target[op] - got[op]).float()
                bias = original[op]
                old = torch.zeros_like(delta) if bias is None else get_tensor(gm, bias).float()
                new = add_constant(gm, f"{op.name}_bias_corrected", old + delta, before=op)
                args = list(op.args) + [None] * (3 - len(op.args))
                args[2] = new
                op.args = tuple(args)
                shifts[op.name] = float(delta.abs().max())
        gm.recompile()

        record: dict[str, Any] = {"pass": self.name, "layers": len(ops), "max_shift": shifts}
        kept = True
        if before is not None:
            after = output_kl(gm, held_out, self.name, reference)
            kept = after < before
            record.update(images=held_out.shape[0], before=round(before, 6), after=round(after, 6))
        record["kept"] = kept
        self.ctx.log.append(record)
        if not kept:  # restore every original bias argument
            for op in ops:
                args = list(op.args)
                args[2] = original[op]
                op.args = tuple(args)
            prune_unused_attributes(gm)
            gm.recompile()
        return PassResult(gm, kept)
