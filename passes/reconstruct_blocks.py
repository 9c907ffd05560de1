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
Invariant checked by the test: no block's output error is higher after than before, and the
model output error drops.
"""

from __future__ import annotations

import torch
from torch import fx
from tqdm.auto import tqdm

from hyq_fx.pass_base import PassError, PassResult, QuantContext, register_pass
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
        self.depth = depth

    def call(self, gm: fx.GraphModule) -> PassResult:
        blocks = partition_blocks(gm, self.depth)
        batches = self._batches()
        modified = False
        bar = tqdm(blocks, desc="reconstruct", disable=not self.ctx.progress, leave=False)
        with torch.enable_grad():
            for block in bar:
                record = self.reconstruct(gm, block, batches)
                modified |= record["loss_after"] < record["loss_before"]
                self.ctx.log.append({"pass": self.name, **record})
        return PassResult(gm, modified)
