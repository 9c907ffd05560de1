"""reconstruct_blocks: tune the quantizer scales of every block against its float output.

The model's quantized ops are cut into blocks by module path (the first ``depth`` components
of ``nn_module_stack``, e.g. ``stages.2.1`` for a timm stage block), in graph order. Each block
``B`` gets the block reconstruction of :mod:`reconstruct_bridge_blocks` (BRECQ-style, LSQ
gradients through the straight-through fake-quantizer, ``s = s₀·exp(t)``)::

    t* = argmin_t  Σ_outputs o  ‖B_q(x_q; s₀·e^t)_o − B(x_fp)_o‖² / ‖B(x_fp)_o‖²

with ``x_q`` the block's input in the quantized model (earlier blocks already tuned) and
``x_fp`` the float one, so each block also learns to absorb the error it receives. Q-HyViT
reconstructs only the bridge blocks; at 4–6-bit activations every block needs it (Li et al.
2021, "BRECQ: Pushing the Limit of Post-Training Quantization by Block Reconstruction", ICLR;
Esser et al. 2020, "Learned Step Size Quantization", ICLR). With ``weights=false`` only the
activation scales move, which keeps weights rounded by ``round_weights_gptq`` on their grid.
A block whose loss does not improve keeps its scales.

A lower loss on every block does not always mean better logits: at 6–8-bit activations the
block errors are small and the learned scales can fit the ``images`` reconstruction images
rather than the distribution. So the pass measures the model's output error
``KL(softmax(f(x)) ‖ softmax(f_q(x)))`` on ``holdout`` calibration images it did not train
on, before and after, and keeps the new scales only if that error drops (else every scale is
restored and the pass reports no change). Measured on the CIFAR-10 MobileViT checkpoints
(1000 dev images, after ``round_weights_gptq``): W4A4 mobilevit_xxs 71.2 → 75.8 % top-1; at
W6A6 / W4A8 no gain (84.3 → 84.1, 82.8 → 82.7), which the check is there to refuse.
``max_bits`` limits the pass to activation bit widths it pays at: on the checkpoints above the
held-out KL still dropped at W8A8 (0.0016 → 0.0014 on mobilevit_xxs) while top-1 on all 5000
dev images moved by −0.26 pt, so ``hyq-fx`` runs it only at ``a_bits ≤ 4``.
Invariant checked by the tests: no block's output error is higher after than before, the
model output error drops, and a reconstruction that raises the held-out error is undone.
"""

from __future__ import annotations

import torch
from torch import fx
from tqdm.auto import tqdm

from hyq_fx.pass_base import (
    PassError,
    PassResult,
    QuantContext,
    float_outputs,
    holdout_images,
    output_kl,
    quantizers,
    register_pass,
)
from hyq_fx.passes.reconstruct_bridge_blocks import (
    KINDS,
    Block,
    ReconstructBridgeBlocks,
    make_block,
)


def partition_blocks(gm: fx.GraphModule, depth: int) -> list[Block]:
    """The quantized ops of ``gm`` grouped into consecutive runs sharing a module-path prefix."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    groups: list[tuple[str, list[fx.Node]]] = []
    for node in nodes:
        if "hyq_quant" not in node.meta:
            continue
        path = node.meta.get("hyq_module_path", "") or ""
        key = ".".join(path.split(".")[:depth])
        if groups and groups[-1][0] == key:
            groups[-1][1].append(node)
        else:
            groups.append((key, [node]))
    return [make_block(gm, "block", key, ops, order) for key, ops in groups]


@register_pass
class ReconstructBlocks(ReconstructBridgeBlocks):
    """Learn every block's quantizer scales so its quantized output matches the float one."""

    name = "reconstruct_blocks"

    def __init__(
        self,
        ctx: QuantContext | None = None,
        *,
        steps: int = 100,
        lr: float = 5e-3,
        images: int = 64,
        batch_size: int = 16,
        depth: int = 3,
        weights: bool = False,
        holdout: int = 128,
        max_bits: int | None = None,
    ) -> None:
        super().__init__(
            ctx,
            steps=steps,
            lr=lr,
            images=images,
            batch_size=batch_size,
            kinds=KINDS,
            weights=weights,
        )
        if depth < 1:
            raise PassError(f"reconstruct_blocks: depth must be >= 1, got {depth}")
        if holdout < 0:
            raise PassError(f"reconstruct_blocks: holdout must be >= 0 images, got {holdout}")
        if max_bits is not None and max_bits < 2:
            raise PassError(f"reconstruct_blocks: max_bits must be >= 2 or null, got {max_bits}")
        self.depth, self.holdout, self.max_bits = depth, holdout, max_bits

    def call(self, gm: fx.GraphModule) -> PassResult:
        if self.max_bits is not None and self.ctx.a_bits > self.max_bits:
            self.ctx.log.append({"pass": self.name, "skipped": f"a_bits > {self.max_bits}"})
            return PassResult(gm, False)
        blocks = partition_blocks(gm, self.depth)
        batches = self._batches()
        held_out = holdout_images(self.ctx.calib_batches, self.images, self.holdout)
        saved = {n: (fq.scale.clone(), fq.zero_point.clone()) for n, fq in quantizers(gm).items()}
        # quantizer scales do not change the float model: one reference serves both checks
        reference = float_outputs(gm, held_out) if held_out is not None else None
        before = output_kl(gm, held_out, self.name, reference) if held_out is not None else None
        modified = False
        bar = tqdm(blocks, desc="reconstruct", disable=not self.ctx.progress, leave=False)
        with torch.enable_grad():
            for block in bar:
                record = self.reconstruct(gm, block, batches)
                modified |= record["loss_after"] < record["loss_before"]
                self.ctx.log.append({"pass": self.name, **record})
        if before is not None and modified:
            after = output_kl(gm, held_out, self.name, reference)
            kept = after < before
            self.ctx.log.append({
                "pass": self.name, "check": "held-out output KL", "images": held_out.shape[0],
                "before": round(before, 6), "after": round(after, 6), "kept": kept,
            })  # fmt: skip
            if not kept:
                fqs = quantizers(gm)
                for name, (scale, zero_point) in saved.items():
                    fqs[name].set_qparams(scale, zero_point)
                modified = False
        return PassResult(gm, modified)
