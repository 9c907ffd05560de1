"""quantize_softmax_log2: log√2 (or log2) quantization of post-softmax attention maps.

Attention probabilities are heavy-tailed in [0, 1]: a few large values, many near zero. RepQ-ViT
(Li et al., ICCV 2023, §4.3) quantizes them on a logarithmic grid with base √2::

    q  = clamp(round(−2·log2(x/δ)), 0, 2^b − 1)
    x̂  = 2^(−⌈q/2⌉) · (1 + (√2 − 1)·(q mod 2)) · δ  =  δ · 2^(−q/2)

(the left form is the integer kernel: a shift, and for odd ``q`` one multiply by √2). Base 2
is ``q = round(−log2(x/δ))``, ``x̂ = δ·2^(−q)``. Here the top code ``2^b − 1`` stands for 0, so
the grid is honest ``b`` bits (RepQ-ViT's reference code adds 0 as an extra level).

The rewrite keeps the project's plain :class:`~hyq_fx.quantizer.FakeQuantizer`: log quantization
is uniform quantization (scale 1, zero-point 0) of the log-domain code ``u``, so each
activation quantizer that reads a softmax output and feeds an attention ``matmul``
(``A·V`` after ``decompose_attention``) is replaced by aten ops around a FakeQuantizer::

    u = min(−k·log2(x/δ), 1024)      k = 2 (base √2) or 1 (base 2); x = 0 gives u = 1024
    û = FQ(u)                        (uint b bits, s = 1, z = 0: the integer code q)
    x̂ = where(û == 2^b − 1, 0, δ · 2^(−û/k))

With the quantizers off, ``x̂ = x`` to float rounding, so ``quantizers_mode(gm, "off")`` still
gives the float graph, and the graph saves and loads with :mod:`hyq_fx.serialize` (aten ops, a
FakeQuantizer and a buffer ``δ``). ``δ`` is searched, as RepQ-ViT does, over the 0.999, 0.9999,
0.99999 quantiles and the maximum of the softmax outputs on the calibration data, for the least
L2 error. Runs after ``insert_quantizers`` (before or after ``calibrate``).
Invariants checked by the test: the graph equals :func:`log_quantize` (the reference, in the
shift-and-multiply form) on the attention maps; the log grid has a lower error than the uniform
quantizer it replaces; with quantizers off the outputs equal the float graph within 1e-5.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from hyq_fx.pass_base import (
    HyqPass,
    PassError,
    PassResult,
    add_constant,
    copy_module_meta,
    quantizers,
    register_pass,
)
from hyq_fx.patterns import is_op, match, wildcard
from hyq_fx.quantizer import FakeQuantizer
from hyq_fx.spec import QuantSpec
from hyq_fx.vocabulary import quantizer_of

aten = torch.ops.aten

SOFTMAX = is_op(aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)(
    wildcard(), ...
).named("softmax")
BASES = {"sqrt2": 2.0, "2": 1.0}  # k: codes per octave
CODE_CAP = 1024.0  # u for x = 0 (log2(0) = −inf); 2^(−CODE_CAP/k) underflows to 0 in float32
PERCENTILES = (0.999, 0.9999, 0.99999)
MAX_SAMPLES = 1 << 20
ROLE = "log_code"


def log_dequantize(q: torch.Tensor, delta: float | torch.Tensor, base: str = "sqrt2"):
    """``x̂`` of integer codes ``q``, as the integer kernel computes it (shift, then √2)."""
    if base == "2":
        return torch.exp2(-q) * delta
    odd = torch.remainder(q, 2)
    return torch.exp2(-torch.ceil(q / 2)) * (1 + (math.sqrt(2) - 1) * odd) * delta


def log_quantize(
    x: torch.Tensor, delta: float | torch.Tensor, bits: int, base: str = "sqrt2"
) -> torch.Tensor:
    """Reference log√2 / log2 quantize-dequantize of ``x >= 0`` (top code = 0)."""
    k = BASES[base]
    qmax = 2**bits - 1
    q = torch.round(-k * torch.log2(x / delta)).clamp(0, qmax)
    return torch.where(q == qmax, torch.zeros_like(x), log_dequantize(q, delta, base))


def search_delta(values: torch.Tensor, bits: int, base: str) -> float:
    """The δ among quantiles {0.999, 0.9999, 0.99999} and the max with the least L2 error."""
    values = values.detach().float().reshape(-1)
    candidates = [values.max()] + [torch.quantile(values, p) for p in PERCENTILES]
    best, best_err = None, math.inf
    for delta in candidates:
        delta = delta.clamp_min(torch.finfo(torch.float32).tiny)
        err = (log_quantize(values, delta, bits, base) - values).pow(2).mean().item()
        if err < best_err:
            best, best_err = float(delta), err
    return best


def _softmax_quantizers(gm: fx.GraphModule) -> list[tuple[fx.Node, list[fx.Node]]]:
    """(quantizer node on a softmax output, the attention matmuls it feeds)."""
    found = []
    for node in gm.graph.nodes:
        fq = quantizer_of(gm, node)
        if fq is None or fq.role != "activation" or match(SOFTMAX, node.args[0]) is None:
            continue
        users = list(node.users)
        if users and all(
            u.target is aten.matmul.default and "hyq_quant" in u.meta and u.args[0] is node
            for u in users
        ):
            found.append((node, users))
    return found


@register_pass
class QuantizeSoftmaxLog2(HyqPass):
    """Quantize post-softmax attention maps on a log√2 (or log2) grid, as RepQ-ViT does."""

    name = "quantize_softmax_log2"

    def __init__(self, ctx=None, *, bits: int | None = None, base: str = "sqrt2") -> None:
        super().__init__(ctx)
        if base not in BASES:
            raise PassError(f"quantize_softmax_log2: base={base!r} is unknown; use 'sqrt2' or '2'")
        self.bits = bits
        self.base = base
        QuantSpec(bits=self.ctx.a_bits if bits is None else bits)  # validates now
        self.deltas: dict[str, float] = {}

    def requires(self, gm: fx.GraphModule) -> None:
        if not quantizers(gm):
            raise PassError(
                "quantize_softmax_log2: the graph has no quantizers; it replaces the activation "
                "quantizer of each softmax → matmul, so put it after insert_quantizers"
            )
        if not self.ctx.calib_batches:
            raise PassError(
                "quantize_softmax_log2: no calibration data; δ is searched on the softmax "
                "outputs of the calibration images"
            )

    def _record(self, gm: fx.GraphModule, nodes: list[fx.Node]) -> dict[fx.Node, torch.Tensor]:
        """Samples of each node's output; uncalibrated quantizers are off meanwhile."""
        wanted = set(nodes)
        samples: dict[fx.Node, list[torch.Tensor]] = {n: [] for n in nodes}
        gen = torch.Generator().manual_seed(self.ctx.seed)
        budget = MAX_SAMPLES // max(1, len(self.ctx.calib_batches))

        class _Recorder(fx.Interpreter):
            def run_node(self, n: fx.Node):
                out = super().run_node(n)
                if n in wanted:
                    flat = out.detach().float().reshape(-1)
                    if flat.numel() > budget:
                        flat = flat[torch.randperm(flat.numel(), generator=gen)[:budget]]
                    samples[n].append(flat)
                return out

        pending = [fq for fq in quantizers(gm).values() if not fq.calibrated]
        modes = [fq.mode for fq in pending]
        for fq in pending:
            fq.mode = "off"
        try:
            with torch.no_grad():
                for batch in self.ctx.calib_batches:
                    _Recorder(gm).run(batch)
        finally:
            for fq, mode in zip(pending, modes, strict=True):
                fq.mode = mode
        return {n: torch.cat(v) for n, v in samples.items()}

    def call(self, gm: fx.GraphModule) -> PassResult:
        sites = _softmax_quantizers(gm)
        self.deltas = {}
        if not sites:
            return PassResult(gm, False)
        bits = self.ctx.a_bits if self.bits is None else self.bits
        k = BASES[self.base]
        qmax = float(2**bits - 1)
        values = self._record(gm, [fq_node.args[0] for fq_node, _ in sites])
        graph = gm.graph
        for fq_node, users in sites:
            x = fq_node.args[0]
            delta = search_delta(values[x], bits, self.base)
            self.deltas[fq_node.target] = delta
            hint = f"{fq_node.target}_log"
            delta_node = add_constant(gm, f"{hint}_delta", torch.tensor([delta]), fq_node)
            fq = FakeQuantizer(QuantSpec(bits=bits), "minmax", ROLE)
            fq.set_qparams(torch.ones(1), torch.zeros(1))
            fq.mode = "quantize"
            fq_name = hint
            while hasattr(gm, fq_name):
                fq_name += "_"
            gm.add_submodule(fq_name, fq)
            with graph.inserting_before(fq_node):
                ratio = graph.call_function(aten.div.Tensor, (x, delta_node))
                log = graph.call_function(aten.log2.default, (ratio,))
                scaled = graph.call_function(aten.mul.Tensor, (log, -k))
                code = graph.call_function(aten.clamp.default, (scaled, None, CODE_CAP))
                code_q = graph.call_module(fq_name, (code,))
                exponent = graph.call_function(aten.mul.Tensor, (code_q, -1.0 / k))
                power = graph.call_function(aten.exp2.default, (exponent,))
                level = graph.call_function(aten.mul.Tensor, (power, delta_node))
                is_zero = graph.call_function(aten.eq.Scalar, (code_q, qmax))
                out = graph.call_function(aten.where.ScalarSelf, (is_zero, 0.0, level))
            new = (ratio, log, scaled, code, code_q, exponent, power, level, is_zero, out)
            for n in new:
                copy_module_meta(x, n)
                if "val" in x.meta and n is not is_zero:
                    n.meta["val"] = x.meta["val"]
            fq_node.replace_all_uses_with(out)
            for user in users:
                record = user.meta["hyq_quant"]
                record["inputs"] = [fq_name if t == fq_node.target else t for t in record["inputs"]]
                record["log_input"] = {"quantizer": fq_name, "base": self.base, "delta": delta}
            graph.erase_node(fq_node)
            # not prune_unused_attributes: it would drop every quantizer's scale buffer too
            gm.delete_submodule(fq_node.target)
        self.ctx.log.append({"pass": self.name, "deltas": dict(self.deltas), "bits": bits})
        return PassResult(gm, True)

    def ensures(self, gm: fx.GraphModule) -> None:
        for node, _ in _softmax_quantizers(gm):
            raise PassError(f"quantize_softmax_log2 left the uniform quantizer {node.target}")
