"""mixed_precision: per-layer bit widths chosen by measured sensitivity under an average budget.

Every selected quantizer ``i`` (each layer's weight; with ``role="both"`` each activation too) is
first set to the highest candidate ``b_max``. Its sensitivity to a lower candidate ``b`` is then
measured alone, on calibration images, at the model output ``y`` (the logits)::

    S_i(b) = mean ‖y(b_i = b, others at b_max) − y(all at b_max)‖²        metric "sqnr"
    S_i(b) = mean KL(softmax y(all at b_max) ‖ softmax y(b_i = b))          metric "kl"

("sqnr": the noise power layer ``i`` adds to the logits, i.e. how far it lowers their SQNR;
each is made non-increasing in ``b``). Bits are then assigned to::

    minimise Σ_i S_i(b_i)   subject to   Σ_i n_i·b_i / Σ_i n_i ≤ B

with ``n_i`` the element count (parameters of a weight; elements per image of an activation;
weights and activations are budgeted separately), greedily: from all ``b_max``, repeatedly lower
the layer whose next-lower candidate costs the least ``ΔS`` per bit·element saved until the
average is within ``B``, then raise back the layers with the most ``ΔS`` per bit·element that
still fit. Sensitive layers keep the high bits, large insensitive ones take the low bits.

A lower-bit weight quantizer is recalibrated from the weight tensor with its own observer; a
lower-bit activation quantizer from the range its calibrated one covered
(``[(qmin − z)s, (qmax − z)s]``). The quantizer is replaced under the same module name, and each
op it feeds records ``meta["hyq_choice"]["w_bits" | "a_bits"]`` and the measured sensitivities.

M2-ViT (Liang, Shi & Wang, "M2-ViT: Accelerating Hybrid Vision Transformers with Two-Level Mixed
Quantization", 2024) mixes precision per layer by sensitivity under a budget, as HAWQ-style
methods do. Invariants checked by the test: the budget is met, and mixed 4/8 bits at a 6-bit
average has a better logit SQNR than uniform 4 bits (and one of the candidate mixes than
uniform 6).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from hyq_fx.fake_quant import qparams_from_range
from hyq_fx.graph import descendants
from hyq_fx.pass_base import HyqPass, PassError, PassResult, get_tensor, quantizers, register_pass
from hyq_fx.quantizer import FakeQuantizer
from hyq_fx.report import sqnr_db
from hyq_fx.spec import MAX_BITS, MIN_BITS
from hyq_fx.vocabulary import quantizers_mode

ROLES = {"weight": ("weight",), "both": ("weight", "activation")}
METRICS = ("sqnr", "kl")
CHOICE_KEY = "hyq_choice"


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for item in out if isinstance(out, (tuple, list)) else ():
        if isinstance(item, torch.Tensor):
            return item
    raise PassError("mixed_precision: the graph returns no tensor to measure sensitivity on")


def requantized(gm: fx.GraphModule, fq_node: fx.Node, bits: int) -> FakeQuantizer:
    """A calibrated copy of the quantizer at ``fq_node`` with ``bits``: a weight from its tensor
    (with the same observer), an activation from the range its calibrated quantizer covered."""
    old: FakeQuantizer = gm.get_submodule(fq_node.target)
    if bits == old.spec.bits:
        return old
    spec = old.spec.replace(bits=bits)
    new = FakeQuantizer(spec, old.observer_name, old.role)
    src = fq_node.args[0]
    if old.role == "weight" and isinstance(src, fx.Node) and src.op == "get_attr":
        with torch.no_grad():
            new(get_tensor(gm, src))
        new.calibrate()
    else:
        lo = (old.spec.qmin - old.zero_point) * old.scale
        hi = (old.spec.qmax - old.zero_point) * old.scale
        new.observer = old.observer
        new.set_qparams(*qparams_from_range(lo, hi, spec))
        new.mode = "quantize"
    return new


class _Cache(fx.Interpreter):
    """Runs the graph once keeping every value, then re-runs only what a node influences."""

    def __init__(self, gm: fx.GraphModule, x: torch.Tensor) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.x = x
        with torch.no_grad():
            self.output = _first_tensor(self.run(x))
        self.values = dict(self.env)

    def rerun_from(self, node: fx.Node) -> torch.Tensor:
        changed = descendants(node)
        env = {n: v for n, v in self.values.items() if n not in changed}
        runner = fx.Interpreter(self.module)
        with torch.no_grad():
            return _first_tensor(runner.run(self.x, initial_env=env))


def greedy_bits(
    sizes: list[int], sens: list[dict[int, float]], candidates: list[int], budget: float
) -> list[int]:
    """Bits per layer minimising Σ sens under Σ size·bits / Σ size ≤ budget (greedy)."""
    bits = [candidates[-1]] * len(sizes)
    total = float(sum(sizes))

    def avg() -> float:
        return sum(n * b for n, b in zip(sizes, bits, strict=True)) / total

    def step(i: int, direction: int) -> int | None:
        k = candidates.index(bits[i]) + direction
        return candidates[k] if 0 <= k < len(candidates) else None

    while avg() > budget + 1e-9:
        moves = []
        for i, n in enumerate(sizes):
            lower = step(i, -1)
            if lower is not None:
                cost = sens[i][lower] - sens[i][bits[i]]
                moves.append((cost / (n * (bits[i] - lower)), i, lower))
        if not moves:
            break
        _, i, lower = min(moves)
        bits[i] = lower
    while True:  # spend what the last step left over, most valuable raise first
        raises = []
        for i, n in enumerate(sizes):
            higher = step(i, +1)
            if higher is None:
                continue
            extra = n * (higher - bits[i]) / total
            if avg() + extra <= budget + 1e-9:
                gain = sens[i][bits[i]] - sens[i][higher]
                raises.append((-gain / (n * (higher - bits[i])), i, higher))
        if not raises:
            break
        _, i, higher = min(raises)
        bits[i] = higher
    return bits


@register_pass
class MixedPrecision(HyqPass):
    """Assign per-layer bit widths (e.g. 4/8) by measured sensitivity under an average budget."""

    name = "mixed_precision"

    def __init__(
        self,
        ctx=None,
        *,
        budget_bits: float | None = None,
        candidates: tuple[int, ...] | list[int] = (4, 8),
        role: str = "weight",
        metric: str = "sqnr",
        max_images: int = 16,
    ) -> None:
        super().__init__(ctx)
        if role not in ROLES:
            raise PassError(f"mixed_precision: role {role!r} is unknown; use one of {list(ROLES)}")
        if metric not in METRICS:
            raise PassError(f"mixed_precision: metric {metric!r} is unknown; use one of {METRICS}")
        cands = sorted(set(candidates))
        if not cands or any(
            isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS
            for b in cands
        ):
            raise PassError(
                f"mixed_precision: candidates {list(candidates)} must be integer bit widths in "
                f"{MIN_BITS}..{MAX_BITS}, e.g. [4, 8]"
            )
        if budget_bits is not None and budget_bits < cands[0]:
            raise PassError(
                f"mixed_precision: budget_bits={budget_bits} is below the smallest candidate "
                f"{cands[0]}; no assignment can meet it (lower the candidates or raise the budget)"
            )
        if max_images < 1:
            raise PassError(f"mixed_precision: max_images must be >= 1, got {max_images}")
        self.budget_bits = budget_bits
        self.candidates = cands
        self.roles = ROLES[role]
        self.metric = metric
        self.max_images = max_images
        self._sizes: dict[str, int] = {}

    def _budget(self, role: str) -> float:
        if self.budget_bits is not None:
            return float(self.budget_bits)
        return float(self.ctx.w_bits if role == "weight" else self.ctx.a_bits)

    def _selected(self, gm: fx.GraphModule) -> dict[str, fx.Node]:
        fqs = quantizers(gm)
        return {
            n.target: n
            for n in gm.graph.nodes
            if n.op == "call_module" and n.target in fqs and fqs[n.target].role in self.roles
        }

    def requires(self, gm: fx.GraphModule) -> None:
        fqs = quantizers(gm)
        missing = [t for t in self._selected(gm) if not fqs[t].calibrated]
        if missing:
            raise PassError(
                f"mixed_precision: quantizer(s) {missing[:5]} are not calibrated; run "
                "'calibrate' before this pass in the recipe"
            )
        for role in self.roles:
            if self._budget(role) < self.candidates[0]:
                raise PassError(
                    f"mixed_precision: the {role} budget {self._budget(role)} bits is below the "
                    f"smallest candidate {self.candidates[0]}; set budget_bits or candidates"
                )
        if not self.ctx.calib_batches:
            raise PassError(
                "mixed_precision: no calibration data; pass calibration images to "
                "hyq_fx.quantize (sensitivities are measured on them)"
            )

    def _images(self) -> torch.Tensor:
        kept: list[torch.Tensor] = []
        count = 0
        for b in self.ctx.calib_batches:
            kept.append(b[: self.max_images - count])
            count += kept[-1].shape[0]
            if count >= self.max_images:
                break
        return torch.cat(kept)

    def _score(self, base: torch.Tensor, test: torch.Tensor) -> float:
        base, test = base.reshape(base.shape[0], -1), test.reshape(test.shape[0], -1)
        if self.metric == "kl":
            return F.kl_div(
                F.log_softmax(test.double(), -1), F.log_softmax(base.double(), -1),
                reduction="batchmean", log_target=True,
            ).item()  # fmt: skip
        return (test.double() - base.double()).pow(2).mean().item()

    def call(self, gm: fx.GraphModule) -> PassResult:
        nodes = self._selected(gm)
        if not nodes:
            return PassResult(gm, False)
        x = self._images()
        top = self.candidates[-1]
        options = {t: {b: requantized(gm, n, b) for b in self.candidates} for t, n in nodes.items()}
        for t, per_bits in options.items():
            gm.add_submodule(t, per_bits[top])
        with torch.no_grad(), quantizers_mode(gm, "off"):
            fp = _first_tensor(gm(x))
        cache = _Cache(gm, x)
        sens: dict[str, dict[int, float]] = {}
        sqnr: dict[str, dict[int, float]] = {}
        for t, node in nodes.items():
            sens[t], sqnr[t] = {top: 0.0}, {top: sqnr_db(fp, cache.output)}
            for b in self.candidates[:-1]:
                gm.add_submodule(t, options[t][b])
                out = cache.rerun_from(node)
                sens[t][b], sqnr[t][b] = self._score(cache.output, out), sqnr_db(fp, out)
            gm.add_submodule(t, options[t][top])
            for lower, higher in zip(self.candidates[-2::-1], self.candidates[:0:-1], strict=True):
                sens[t][lower] = max(sens[t][lower], sens[t][higher])  # fewer bits: no better
        self._sizes = {t: self._size(gm, n, cache) for t, n in nodes.items()}
        del cache
        chosen: dict[str, int] = {}
        for role in self.roles:
            names = [t for t in nodes if options[t][top].role == role]
            if not names:
                continue
            sizes = [self._sizes[t] for t in names]
            bits = greedy_bits(sizes, [sens[t] for t in names], self.candidates, self._budget(role))
            chosen.update(zip(names, bits, strict=True))
            average = sum(n * b for n, b in zip(sizes, bits, strict=True)) / sum(sizes)
            self.ctx.log.append(
                {"pass": self.name, "role": role, "average_bits": round(average, 4),
                 "budget_bits": self._budget(role), "layers": len(names),
                 "bits_histogram": {str(b): bits.count(b) for b in self.candidates}}
            )  # fmt: skip
        for t, b in chosen.items():
            gm.add_submodule(t, options[t][b])
            self._record(nodes[t], options[t][b].role, b, sens[t], sqnr[t])
        return PassResult(gm, True)

    def _size(self, gm: fx.GraphModule, node: fx.Node, cache: _Cache) -> int:
        """Parameters of a weight; elements per image of an activation."""
        src = node.args[0]
        if isinstance(src, fx.Node) and src.op == "get_attr":
            return get_tensor(gm, src).numel()
        return max(1, cache.values[src].numel() // cache.x.shape[0])

    def _record(self, node: fx.Node, role: str, bits: int, sens: dict, sqnr: dict) -> None:
        key = "w_bits" if role == "weight" else "a_bits"
        for op in node.users:
            if "hyq_quant" not in op.meta:
                continue
            choice = op.meta.get(CHOICE_KEY)
            choice = dict(choice) if isinstance(choice, dict) else {}
            choice[key] = bits
            choice[f"{key}_sensitivity"] = {str(b): float(f"{v:.6g}") for b, v in sens.items()}
            choice[f"{key}_logit_sqnr_db"] = {
                str(b): round(v, 3) if math.isfinite(v) else None for b, v in sqnr.items()
            }
            op.meta[CHOICE_KEY] = choice

    def ensures(self, gm: fx.GraphModule) -> None:
        fqs = quantizers(gm)
        for role in self.roles:
            pairs = [(n, fqs[t].spec.bits) for t, n in self._sizes.items() if fqs[t].role == role]
            if not pairs:
                continue
            average = sum(n * b for n, b in pairs) / sum(n for n, _ in pairs)
            if average > self._budget(role) + 1e-6:
                raise PassError(
                    f"mixed_precision: the {role} bits average {average:.3f} is over the budget "
                    f"{self._budget(role)}"
                )
