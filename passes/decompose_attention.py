"""decompose_attention: expose the two attention matmuls hidden inside SDPA.

Rewrite (Vaswani et al. 2017; the form timm uses when ``fused_attn`` is off)::

    sdpa(Q, K, V, scale=s)  =  softmax((s·Q) · Kᵀ [+ M], dim=-1) · V

with ``s = 1/sqrt(d)`` when unset and ``M`` an additive float mask. After it,
``insert_quantizers`` can quantize the inputs of ``Q·Kᵀ`` and ``A·V``, as Q-HyViT and RepQ-ViT
do. Invariant checked by the test: outputs equal the original within 1e-5.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from hyq_fx.pass_base import HyqPass, PassError, PassResult, copy_module_meta, register_pass
from hyq_fx.patterns import is_op, match_all, wildcard

aten = torch.ops.aten

PATTERN = is_op(aten.scaled_dot_product_attention.default)(
    wildcard(), wildcard(), wildcard(), ...
).named("sdpa")


def _option(node: fx.Node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


@register_pass
class DecomposeAttention(HyqPass):
    """Split scaled_dot_product_attention into matmul · softmax · matmul (exact)."""

    name = "decompose_attention"

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        modified = False
        for m in match_all(gm, PATTERN):
            node = m["sdpa"]
            q, k, v = node.args[:3]
            mask = _option(node, 3, "attn_mask", None)
            dropout = _option(node, 4, "dropout_p", 0.0)
            causal = _option(node, 5, "is_causal", False)
            scale = _option(node, 6, "scale", None)
            if causal or dropout:
                raise PassError(
                    f"decompose_attention: {node.name} ({node.meta.get('hyq_module_path')}) uses "
                    "is_causal or dropout, which vision inference graphs should not; export the "
                    "model in eval mode without causal masking"
                )
            if mask is not None and mask.meta["val"].dtype == torch.bool:
                raise PassError(
                    f"decompose_attention: {node.name} has a boolean attention mask; only additive "
                    "float masks are supported (convert it with mask.float().masked_fill(~m, -inf))"
                )
            if scale is None:
                head_dim = q.meta["val"].shape[-1]
                scale = 1.0 / math.sqrt(int(head_dim))
            with graph.inserting_before(node):
                new = [
                    graph.call_function(aten.mul.Tensor, (q, float(scale))),
                ]
                new.append(graph.call_function(aten.transpose.int, (k, -2, -1)))
                new.append(graph.call_function(aten.matmul.default, (new[0], new[1])))
                scores = new[-1]
                if mask is not None:
                    scores = graph.call_function(aten.add.Tensor, (scores, mask))
                    new.append(scores)
                new.append(graph.call_function(aten.softmax.int, (scores, -1)))
                new.append(graph.call_function(aten.matmul.default, (new[-1], v)))
            for n in new:
                copy_module_meta(node, n)
            new[2].meta["hyq_role"] = "attn_qk"
            new[-1].meta["hyq_role"] = "attn_av"
            node.replace_all_uses_with(new[-1])
            graph.erase_node(node)
            modified = True
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            if node.target is aten.scaled_dot_product_attention.default:
                raise PassError(f"decompose_attention left {node.name} in the graph")
