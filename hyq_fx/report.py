"""Per-layer quantization report: what each quantized op got, and how much signal survived.

``sqnr_db`` of an op is ``10·log10(Σ y² / Σ (y − ŷ)²)`` between its output in the float graph
(all quantizers off) and in the quantized graph, on the same inputs. Errors accumulate, so
this is the SQNR seen at that op, upstream quantization included.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx

from .pass_base import record_node_outputs
from .vocabulary import quantizers_mode


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    signal = reference.double().pow(2).sum().item()
    noise = (reference.double() - test.double()).pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def quantized_ops(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if "hyq_quant" in n.meta]


def layer_name(node: fx.Node) -> str:
    path = node.meta.get("hyq_module_path") or ""
    op = node.meta["hyq_quant"]["op"].split(".")[0]
    return f"{path}:{op}" if path else f"{node.name}:{op}"


def layer_report(gm: fx.GraphModule, batch: torch.Tensor) -> list[dict[str, Any]]:
    """One entry per quantized op: name, bits, granularity, scheme and SQNR on ``batch``."""
    ops = quantized_ops(gm)
    names = {n.name for n in ops}
    with quantizers_mode(gm, "off"):
        fp = record_node_outputs(gm, batch, names)
    quant = record_node_outputs(gm, batch, names)
    rows = []
    for node in ops:
        record = node.meta["hyq_quant"]
        w = gm.get_submodule(record["weight"]) if record["weight"] else None
        acts = [gm.get_submodule(t) for t in record["inputs"]]
        a = acts[0] if acts else None
        rows.append(
            {
                "name": layer_name(node),
                "node": node.name,
                "op": record["op"].split(".")[0],
                "w_bits": w.spec.bits if w else None,
                "a_bits": a.spec.bits if a else None,
                "granularity": {
                    "weight": w.spec.granularity if w else None,
                    "activation": a.spec.granularity if a else None,
                },
                "scheme": {
                    "weight": w.spec.scheme if w else None,
                    "activation": a.spec.scheme if a else None,
                },
                "sqnr_db": round(sqnr_db(fp[node.name], quant[node.name]), 3),
            }
        )
    return rows
