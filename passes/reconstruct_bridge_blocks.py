"""reconstruct_bridge_blocks: tune the quantizer scales of each conv↔transformer bridge block.

For every bridge block ``B`` (found from the graph: a conv→transformer transition of
:func:`hyq_fx.graph.find_regions`, from the first quantized op of the module that holds the
transition up to the first quantized op after the region's first softmax; and, with
``"transformer->conv"`` in ``kinds``, from the region's last softmax to the end of that module),
the scales ``s`` of the quantizers inside ``B`` are learned (BRECQ-style block reconstruction,
LSQ gradients through the straight-through fake-quantizer, ``s = s₀·exp(t)``)::

    t* = argmin_t  Σ_outputs o  ‖B_q(x_q; s₀·e^t)_o − B(x_fp)_o‖² / ‖B(x_fp)_o‖²

where ``x_q`` is the block input in the quantized model (earlier blocks already reconstructed),
``x_fp`` the float one, and the outputs are every tensor of ``B`` used after it (the attention
output and the residual that bypasses it). Zero-points stay fixed. (Lee et al. 2023, "Q-HyViT:
Post-Training Quantization of Hybrid Vision Transformers with Bridge Block Reconstruction",
§4.2; Li et al. 2021, "BRECQ", ICLR; Esser et al. 2020, "LSQ", ICLR.) A block whose loss does
not improve keeps its scales. Runs after ``calibrate``.
Invariant checked by the test: each block's output error is lower after than before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from tqdm.auto import tqdm

from hyq_fx.graph import Region, descendants, find_regions
from hyq_fx.pass_base import (
    HyqPass,
    PassError,
    PassResult,
    QuantContext,
    quantizers,
    record_node_outputs,
    register_pass,
)
from hyq_fx.vocabulary import is_quantizer, quantizer_of, quantizers_mode

KINDS = ("conv->transformer", "transformer->conv")
_SOFTMAX = {torch.ops.aten.softmax.int, torch.ops.aten._softmax.default}


@dataclass
class Block:
    """A bridge block: its quantized ops, the nodes to run, its inputs and outputs."""

    kind: str
    module: str
    ops: list[fx.Node]
    span: list[fx.Node]
    inputs: list[fx.Node]
    outputs: list[fx.Node]


def _regions(gm: fx.GraphModule) -> list[Region]:
    """find_regions, with each quantizer node given its input's ``meta["val"]`` meanwhile.

    insert_quantizers leaves its call_module nodes without ``val``, which hides the shapes the
    analysis needs (a quantized 3x3 conv would not be seen as a spatial op).
    """
    added = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and "val" not in node.meta and node.args:
            src = node.args[0]
            if isinstance(src, fx.Node) and "val" in src.meta:
                node.meta["val"] = src.meta["val"]
                added.append(node)
    try:
        return find_regions(gm)
    finally:
        for node in added:
            del node.meta["val"]


def _path(node: fx.Node) -> str:
    return node.meta.get("hyq_module_path", "") or ""


def _within(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def _common(a: str, b: str) -> str:
    out = []
    for x, y in zip(a.split("."), b.split("."), strict=False):
        if x != y:
            break
        out.append(x)
    return ".".join(out)


def find_bridge_blocks(gm: fx.GraphModule, kinds: tuple[str, ...] = KINDS) -> list[Block]:
    """The bridge blocks of ``gm`` (quantizers inserted), in graph order."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    by_name = {n.name: n for n in nodes}
    qops = [n for n in nodes if "hyq_quant" in n.meta]
    blocks: list[Block] = []
    for region in _regions(gm):
        attn = [by_name[a] for a in region.attention]
        soft = [a for a in attn if a.target in _SOFTMAX] or attn
        for t in region.transitions:
            if t.kind not in kinds:
                continue
            entry, exit_ = by_name[t.entry], by_name[t.exit]
            if t.kind == "conv->transformer":
                after = [a for a in soft if order[a] > order[exit_]]
                if not after:
                    continue
                first = after[0]
                module = _common(_path(entry), _path(first)) or _path(entry).rpartition(".")[0]
                reach = descendants(first)
                end = next((q for q in qops if order[q] > order[first] and q in reach), None)
                if end is None:
                    continue
                if module:
                    ops = [q for q in qops if order[q] <= order[end] and _within(_path(q), module)]
                    ops += [] if _within(_path(end), module) else [end]
                else:  # no enclosing module: from the op that produces the crossing tensor
                    start = max((order[q] for q in qops if order[q] <= order[entry]), default=0)
                    ops = [q for q in qops if start <= order[q] <= order[end]]
            else:
                before = [a for a in soft if order[a] < order[entry]]
                consumers = [q for q in qops if q in descendants(exit_)]
                if not before or not consumers:
                    continue
                last = before[-1]
                module = _common(_path(last), _path(consumers[0]))
                ops = [q for q in qops if order[q] > order[last]]
                if module:
                    ops = [q for q in ops if _within(_path(q), module)]
                else:  # no enclosing module: up to the first op on the conv side
                    ops = [q for q in ops if order[q] <= order[consumers[0]]]
            if ops:
                blocks.append(make_block(gm, t.kind, module, ops, order))
    return sorted(blocks, key=lambda b: order[b.ops[0]])


def _constant(node: fx.Node) -> bool:
    """A get_attr, or a node computed from get_attrs only (a weight's quantizer)."""
    return node.op == "get_attr" or (
        node.op == "call_module" and all(a.op == "get_attr" for a in node.all_input_nodes)
    )


def _is_tensor(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return val is None or isinstance(val, torch.Tensor)


def make_block(gm, kind: str, module: str, ops: list[fx.Node], order) -> Block:
    """The nodes between the block's first activation quantizer and its last op that feed its
    ops (weight quantizers wherever they sit), its inputs and its outputs."""
    acts = [a for op in ops for a in op.all_input_nodes if not _constant(a)]
    lo = min(order[n] for n in ops + acts)
    hi = max(order[n] for n in ops)
    needed = set(ops)
    for node in reversed(list(gm.graph.nodes)):
        if node in needed:
            for a in node.all_input_nodes:
                if a.op != "get_attr" and (_constant(a) or lo <= order[a] <= hi):
                    needed.add(a)
    span = sorted(needed, key=order.__getitem__)
    inside = set(span)
    inputs = sorted(
        {a for n in span for a in n.all_input_nodes if a not in inside and a.op != "get_attr"},
        key=order.__getitem__,
    )
    outputs = [n for n in span if _is_tensor(n) and any(u not in inside for u in n.users)]
    return Block(kind, module, ops, span, inputs, outputs)


def extract_block(gm: fx.GraphModule, block: Block) -> fx.GraphModule:
    """A GraphModule computing ``block.outputs`` from ``block.inputs``; it shares ``gm``'s
    parameters and quantizer modules."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in block.inputs:
        env[node] = graph.placeholder(node.name)
    for node in block.span:
        for a in node.all_input_nodes:
            if a not in env and a.op == "get_attr":
                env[a] = graph.node_copy(a)
        env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(tuple(env[n] for n in block.outputs))
    return fx.GraphModule(gm, graph)


def _loss(outs, targets) -> torch.Tensor:
    total = 0.0
    for y, t in zip(outs, targets, strict=True):
        if isinstance(y, torch.Tensor) and y.is_floating_point():
            total = total + (y - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)
    return total


@register_pass
class ReconstructBridgeBlocks(HyqPass):
    """Learn the quantizer scales of each conv↔transformer bridge block to match its FP output."""

    name = "reconstruct_bridge_blocks"

    def __init__(
        self,
        ctx: QuantContext | None = None,
        *,
        steps: int = 100,
        lr: float = 5e-3,
        images: int = 32,
        batch_size: int = 8,
        kinds: tuple[str, ...] | list[str] = ("conv->transformer",),
        weights: bool = True,
    ) -> None:
        super().__init__(ctx)
        bad = sorted(set(kinds) - set(KINDS))
        if bad or not kinds:
            raise PassError(f"reconstruct_bridge_blocks: kinds={list(kinds)}; use some of {KINDS}")
        if steps < 0 or lr <= 0 or images < 1 or batch_size < 1:
            raise PassError(
                "reconstruct_bridge_blocks: need steps >= 0, lr > 0, images >= 1, batch_size >= 1"
                f" (got steps={steps}, lr={lr}, images={images}, batch_size={batch_size})"
            )
        self.steps, self.lr, self.images, self.batch_size = steps, lr, images, batch_size
        self.kinds, self.weights = tuple(kinds), weights

    def requires(self, gm: fx.GraphModule) -> None:
        if not self.ctx.calib_batches:
            raise PassError(
                "reconstruct_bridge_blocks: no calibration data; pass calibration images to "
                "hyq_fx.quantize"
            )
        pending = [n for n, fq in quantizers(gm).items() if not fq.calibrated]
        if pending:
            raise PassError(
                f"reconstruct_bridge_blocks: {len(pending)} quantizer(s) are uncalibrated "
                f"(e.g. '{pending[0]}'); run calibrate before this pass"
            )

    def _batches(self) -> list[torch.Tensor]:
        x = torch.cat(self.ctx.calib_batches)[: self.images]
        return list(x.split(self.batch_size))

    def call(self, gm: fx.GraphModule) -> PassResult:
        blocks = find_bridge_blocks(gm, self.kinds)
        batches = self._batches()
        modified = False
        bar = tqdm(blocks, desc="reconstruct", disable=not self.ctx.progress, leave=False)
        for block in bar:
            record = self.reconstruct(gm, block, batches)
            modified |= record["loss_after"] < record["loss_before"]
            for op in block.ops:
                op.meta["hyq_reconstruct"] = record
            self.ctx.log.append({"pass": self.name, **record})
        return PassResult(gm, modified)

    def reconstruct(self, gm, block: Block, batches) -> dict[str, Any]:
        sub = extract_block(gm, block)
        fq_names = [
            n.target
            for n in block.span
            if is_quantizer(gm, n) and (self.weights or quantizer_of(gm, n).role == "activation")
        ]
        fqs = {n: gm.get_submodule(n) for n in fq_names if gm.get_submodule(n).mode == "quantize"}
        in_names = [n.name for n in block.inputs]
        out_names = [n.name for n in block.outputs]
        data = []
        for batch in batches:
            got = record_node_outputs(gm, batch, in_names)
            with quantizers_mode(gm, "off"):
                fp = record_node_outputs(gm, batch, out_names)
            data.append(([got[n] for n in in_names], [fp[n] for n in out_names]))
        base = {n: fq.scale.detach().clone() for n, fq in fqs.items()}
        logs = {n: torch.zeros_like(s, requires_grad=True) for n, s in base.items()}

        def run(inputs, grad: bool):
            scales = {f"{n}.scale": base[n] * torch.exp(logs[n]) for n in fqs}
            with torch.set_grad_enabled(grad):
                out = torch.func.functional_call(sub, scales, tuple(inputs))
            return out if isinstance(out, tuple) else (out,)

        def total() -> float:
            with torch.no_grad():
                return sum(float(_loss(run(x, False), y)) for x, y in data) / len(data)

        before = total()
        if fqs and self.steps:
            opt = torch.optim.Adam(list(logs.values()), lr=self.lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.steps)
            for step in range(self.steps):
                x, y = data[step % len(data)]
                loss = _loss(run(x, True), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        after = total()
        if after < before and all(torch.isfinite(t).all() for t in logs.values()):
            for n, fq in fqs.items():
                fq.set_qparams(base[n] * torch.exp(logs[n].detach()), fq.zero_point)
        else:
            after = before
        return {
            "kind": block.kind,
            "module": block.module,
            "ops": [op.name for op in block.ops],
            "outputs": [n.name for n in block.outputs],
            "quantizers": len(fqs),
            "steps": self.steps,
            "loss_before": round(before, 6),
            "loss_after": round(after, 6),
        }

    def ensures(self, gm: fx.GraphModule) -> None:
        for name, fq in quantizers(gm).items():
            if not (torch.isfinite(fq.scale).all() and (fq.scale > 0).all()):
                raise PassError(f"reconstruct_bridge_blocks: quantizer '{name}' has a bad scale")
