"""integer_softmax: replace softmax by HyQ's integer-only softmax with a linear exp.

With the softmax input quantized, ``x = S·x_q`` (``x_q`` integer), and ``d = x_q − max(x_q)``::

    t  = round(d · S·2^K/ln2)             requantize to the grid ln2/2^K (one fixed-point rescale)
    q  = floor(−t / 2^K),  r = t + q·2^K   so  x − max = −q·ln2 + r·ln2/2^K,  r·ln2/2^K ∈ (−ln2, 0]
    e  = 2^K + round(c·ln2 · r)            exp(r') ≈ 1 + c·r' on (−ln2, 0], fixed point 2^K ≙ 1
    p  = floor(e / 2^q)                    exp(x − max) = 2^(−q)·exp(r') is a right shift
    y_q = floor((p·(2^b − 1) + ⌊Σp/2⌋) / Σp),   y = y_q / (2^b − 1)   (unsigned b-bit output)

(Kim, Lee & Kim, "HyQ: Hardware-Friendly Post-Training Quantization for CNN-Transformer Hybrid
Networks", IJCAI 2024, §3.3: a linear function in place of I-BERT's second-order polynomial.)
The slope ``c``: softmax normalisation cancels any common factor ``k`` of the exp approximation,
so ``k·(1 + c·r)`` is fitted to ``exp(r)`` by least squares on ``r ∈ (−ln2, 0]``; the line
``0.9694 + 0.7157·r`` gives ``c = 0.7383`` (with ``k = 1`` forced the fit is 0.7819; the
relative-error fit and the continuous chord are ``1/(2·ln2) = 0.7213``, HyQ code's ``1 − f/2``
in base 2). ``K = 15`` fraction bits keep every intermediate an exact integer in float32 for
``b ≤ 8`` output bits and up to 512 tokens.

The rewrite emits only aten ops (div, round, amax, floor, exp2, sum...), so the graph saves and
exports. The input gets a symmetric per-tensor ``input_bits`` quantizer (calibrated here; one
already on the input is used instead) whose ``scale`` buffer is ``S``. ``input_bits`` defaults to
8 whatever ``a_bits`` is: the logits come from a requantized accumulator, and 6-bit logits alone
cost up to 0.09 of probability. ``bits`` (default ``a_bits``) is the output width; a quantizer
right after the softmax is reset to that grid (scale ``1/(2^b − 1)``, zero-point 0), which it
then leaves unchanged. The integer arithmetic stays in place when quantizers are switched off.
Measured against float softmax (64 tokens, logits ~ N(0, 3²), 8-bit output): max |error|
0.0135 with 16-bit inputs, 0.032 with 8-bit inputs (mean 7e-4 / 8e-4); rounding a float
softmax to 8 bits alone gives 0.002 / 5e-4.
Invariant checked by the test: the result is on the b-bit grid, rows sum to 1 within the
rounding, and the error against float softmax is bounded.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from hyq_fx.pass_base import (
    HyqPass,
    PassError,
    PassResult,
    add_module_call,
    copy_module_meta,
    get_pass,
    register_pass,
)
from hyq_fx.patterns import is_op, match_all, wildcard
from hyq_fx.quantizer import FakeQuantizer
from hyq_fx.spec import QuantSpec
from hyq_fx.vocabulary import owner_of, quantizer_of

aten = torch.ops.aten

SLOPE = 0.7383  # least-squares c of k·(1 + c·r) ≈ exp(r) on (−ln2, 0] (see the module docstring)
EXP_FRAC_BITS = 15  # K: fixed-point fraction bits of exp(r)
SLOPE_FRAC_BITS = 15  # the constant c·ln2 as an integer over 2^15
MAX_OUT_BITS = 8

PATTERN = is_op(aten.softmax.int)(wildcard(), wildcard(), ...).named("softmax")


@register_pass
class IntegerSoftmax(HyqPass):
    """Replace softmax with HyQ's integer softmax (linear exp, shift, integer division)."""

    name = "integer_softmax"

    def __init__(
        self,
        ctx=None,
        *,
        bits: int | None = None,
        input_bits: int = 8,
        slope: float = SLOPE,
    ) -> None:
        super().__init__(ctx)
        self.bits = self.ctx.a_bits if bits is None else bits
        self.input_bits = input_bits
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise PassError(f"integer_softmax: bits must be an int, got {self.bits!r}")
        if not 2 <= self.bits <= MAX_OUT_BITS:
            raise PassError(
                f"integer_softmax: bits={self.bits} is outside 2..{MAX_OUT_BITS}; the integer "
                f"arithmetic is emulated exactly in float32 only up to {MAX_OUT_BITS} output bits"
            )
        QuantSpec(bits=self.input_bits)  # validates, with a clear message
        if not 0.5 <= float(slope) <= 1.0 / math.log(2.0):
            raise PassError(
                f"integer_softmax: slope={slope} must lie in [0.5, 1/ln2] for 1 + c·r to stay a "
                "positive, increasing approximation of exp(r) on (−ln2, 0]"
            )
        self.slope = float(slope)

    def requires(self, gm: fx.GraphModule) -> None:
        needs_data = any(
            (fq := quantizer_of(gm, m["softmax"].args[0])) is None or not fq.calibrated
            for m in match_all(gm, PATTERN)
        )
        if needs_data and not self.ctx.calib_batches:
            raise PassError(
                "integer_softmax: the softmax inputs need a calibrated quantizer and there is no "
                "calibration data; pass calibration images to hyq_fx.quantize"
            )

    def _input_quantizers(self, gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
        pairs = []
        for m in match_all(gm, PATTERN):
            sm = m["softmax"]
            src = sm.args[0]
            fq = quantizer_of(gm, src)
            if fq is not None and (fq.spec.per_channel or not fq.spec.symmetric):
                where = f"{sm.name} ({sm.meta.get('hyq_module_path', '?')})"
                raise PassError(
                    f"integer_softmax: the quantizer {src.target} before {where} is "
                    f"{fq.spec.describe()}; the integer softmax needs a symmetric per-tensor input"
                )
            if fq is None:
                spec = QuantSpec(bits=self.input_bits, symmetric=True)
                fq_node = add_module_call(
                    gm, f"fq_{sm.name}_in", FakeQuantizer(spec, "minmax", "activation"), src, src
                )
                sm.replace_input_with(src, fq_node)
                src = fq_node
            pairs.append((sm, src))
        return pairs

    def _emit(self, gm: fx.GraphModule, sm: fx.Node, fq_node: fx.Node) -> fx.Node:
        graph = gm.graph
        dim = sm.args[1]
        k = float(2**EXP_FRAC_BITS)
        levels = float(2**self.bits - 1)
        c_ln2 = round(self.slope * math.log(2.0) * 2**SLOPE_FRAC_BITS) / 2**SLOPE_FRAC_BITS
        new: list[fx.Node] = []

        def op(target, *args) -> fx.Node:
            node = graph.call_function(target, args)
            new.append(node)
            return node

        with graph.inserting_before(sm):
            scale = graph.get_attr(f"{fq_node.target}.scale")
            new.append(scale)
            xq = op(aten.round.default, op(aten.div.Tensor, fq_node, scale))
            d = op(aten.sub.Tensor, xq, op(aten.amax.default, xq, [dim], True))
            mult = op(aten.mul.Tensor, scale, k / math.log(2.0))
            t = op(aten.round.default, op(aten.mul.Tensor, d, mult))
            q = op(aten.floor.default, op(aten.mul.Tensor, t, -1.0 / k))
            r = op(aten.add.Tensor, t, op(aten.mul.Tensor, q, k))
            lin = op(aten.floor.default, op(aten.add.Tensor, op(aten.mul.Tensor, r, c_ln2), 0.5))
            e = op(aten.add.Tensor, lin, k)
            shift = op(aten.exp2.default, op(aten.neg.default, q))
            p = op(aten.floor.default, op(aten.mul.Tensor, e, shift))
            total = op(aten.sum.dim_IntList, p, [dim], True)
            half = op(aten.floor.default, op(aten.mul.Tensor, total, 0.5))
            num = op(aten.add.Tensor, op(aten.mul.Tensor, p, levels), half)
            yq = op(aten.floor.default, op(aten.div.Tensor, num, total))
            out = op(aten.div.Tensor, yq, levels)
        for node in new:
            copy_module_meta(sm, node)
        out.meta["hyq_int_softmax"] = {
            "bits": self.bits,
            "input_bits": quantizer_of(gm, fq_node).spec.bits,
            "slope": self.slope,
            "exp_frac_bits": EXP_FRAC_BITS,
        }
        if "val" in sm.meta:
            out.meta["val"] = sm.meta["val"]
        return out

    def _reset_output_quantizers(self, gm: fx.GraphModule, out: fx.Node) -> None:
        for user in list(out.users):
            old = quantizer_of(gm, user)
            if old is None or old.role != "activation" or old.spec.per_channel:
                continue
            spec = old.spec.replace(bits=self.bits, symmetric=False)
            fq = FakeQuantizer(spec, old.observer_name, old.role)
            fq.set_qparams(torch.tensor([1.0 / (2**self.bits - 1)]), torch.zeros(1))
            fq.mode = "quantize"
            owner, name = owner_of(gm, user.target)
            setattr(owner, name, fq)

    def call(self, gm: fx.GraphModule) -> PassResult:
        pairs = self._input_quantizers(gm)
        if not pairs:
            return PassResult(gm, False)
        gm.recompile()
        if any(not quantizer_of(gm, fq_node).calibrated for _, fq_node in pairs):
            get_pass("calibrate")(self.ctx)(gm)  # sets only quantizers without a scale yet
        for sm, fq_node in pairs:
            out = self._emit(gm, sm, fq_node)
            sm.replace_all_uses_with(out)
            gm.graph.erase_node(sm)
            self._reset_output_quantizers(gm, out)
        self.ctx.log.append({"pass": self.name, "replaced": [sm.name for sm, _ in pairs]})
        return PassResult(gm, True)

    def ensures(self, gm: fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            if node.target is aten.softmax.int:
                raise PassError(f"integer_softmax left {node.name} in the graph")
