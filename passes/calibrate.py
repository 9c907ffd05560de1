"""calibrate: run the calibration batches and give every observing quantizer its scale.

Static PTQ calibration: with all quantizers observing (the graph computes in float), each
observer records its tensor over the calibration set; then ``(s, z)`` are derived from the
observed range (``s = (max − min)/(qmax − qmin)``, ``z = qmin − round(min/s)``, or the
symmetric ``s = max|x|/qmax``) and the quantizers switch to fake-quantizing. Quantizers that
already have a scale are left as they are, so a later pass may add quantizers and calibrate
again. Non-finite values are caught at the first node that produces them.
Invariant checked by the test: afterwards every quantizer is calibrated and quantizing.
"""

from __future__ import annotations

import torch
from torch import fx
from tqdm.auto import tqdm

from hyq_fx.nonfinite import NonFiniteError, first_nonfinite_node, nonfinite_message
from hyq_fx.pass_base import HyqPass, PassError, PassResult, quantizers, register_pass

__all__ = ["Calibrate", "NonFiniteError", "first_nonfinite_node", "nonfinite_message"]


@register_pass
class Calibrate(HyqPass):
    """Observe the calibration batches, then set each new quantizer's scale and zero-point."""

    name = "calibrate"

    def requires(self, gm: fx.GraphModule) -> None:
        if not self.ctx.calib_batches:
            raise PassError(
                "calibrate: no calibration data; pass calibration images to hyq_fx.quantize "
                "(a DataLoader or a list of tensors)"
            )

    def call(self, gm: fx.GraphModule) -> PassResult:
        pending = {name: fq for name, fq in quantizers(gm).items() if not fq.calibrated}
        if not pending:
            return PassResult(gm, False)
        for fq in pending.values():
            fq.set_mode("observe")
        batches = tqdm(
            self.ctx.calib_batches, desc="calibrate", disable=not self.ctx.progress, leave=False
        )
        with torch.no_grad():
            for i, batch in enumerate(batches):
                out = gm(batch)
                outs = out if isinstance(out, (tuple, list)) else (out,)
                if not all(torch.isfinite(o).all() for o in outs if isinstance(o, torch.Tensor)):
                    node = first_nonfinite_node(gm, batch)
                    raise NonFiniteError(f"calibrate: {nonfinite_message(node, i)}")
        for name, fq in pending.items():
            if not fq.observer.ready:
                raise PassError(
                    f"calibrate: quantizer '{name}' saw no data; its op is not reached by the "
                    "calibration inputs"
                )
            fq.calibrate()
        return PassResult(gm, True)

    def ensures(self, gm: fx.GraphModule) -> None:
        for name, fq in quantizers(gm).items():
            if not fq.calibrated:
                raise PassError(f"calibrate: quantizer '{name}' is still uncalibrated")
