"""Where NaN or Inf first appears in a graph: the error type and its diagnosis.

Shared by the ``calibrate`` pass (NaN/Inf while calibrating) and :func:`hyq_fx.quantize` (a
recipe failed because the float model itself is not finite); it lives below both so that the
quantize API does not import a pass module.
"""

from __future__ import annotations

import torch
from torch import fx

from .pass_base import PassError


class NonFiniteError(PassError):
    """NaN or Inf appeared while calibrating."""


def first_nonfinite_node(gm: fx.GraphModule, batch: torch.Tensor) -> fx.Node | None:
    """The first node (in execution order) whose output holds NaN or Inf for ``batch``."""
    found: list[fx.Node] = []

    class _Finder(fx.Interpreter):
        def run_node(self, n: fx.Node):
            out = super().run_node(n)
            if not found and isinstance(out, torch.Tensor) and out.is_floating_point():
                if not torch.isfinite(out).all():
                    found.append(n)
            return out

    with torch.no_grad():
        _Finder(gm).run(batch)
    return found[0] if found else None


def nonfinite_message(node: fx.Node | None, batch_index: int) -> str:
    """Where NaN/Inf first appears, and what to check."""
    if node is None:
        where = "the output"
    else:
        module = node.meta.get("hyq_module_path") or "<root>"
        where = f"node '{node.name}' ({node.target}, module '{module}')"
    return (
        f"NaN/Inf first appears at {where} on calibration batch {batch_index}; "
        "check the input preprocessing (mean/std) and the model's weights"
    )
