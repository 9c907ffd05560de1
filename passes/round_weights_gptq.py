"""round_weights_gptq: round conv/linear weights by second-order error feedback (GPTQ).

Round-to-nearest treats every weight on its own. GPTQ (Frantar, Ashkboos, Hoefler & Alistarh,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers", ICLR 2023,
after Optimal Brain Quantization) rounds the columns of each output row one at a time and
spreads each rounding error over the columns not yet rounded, so that the layer output on the
calibration inputs moves as little as possible::

    min_Ŵ ‖Ŵ X − W X‖²_F ,   H = 2 X Xᵀ + λ I        (X: the op's quantized calibration inputs)
    for column j (largest diag H first):  q_j = Q(w_j),   e = (w_j − q_j) / U_jj,
                                           w_{j+1:} −= e · U_{j, j+1:}       (U = chol(H⁻¹)ᵀ)

A conv's columns are its ``(in_channel, kh, kw)`` taps (``X`` is the unfolded input); a grouped
or depthwise conv has one ``H`` per group. Before rounding, each row's scale is shrunk to the
clipping ``α·s`` (``α`` on a grid) with the least H-weighted error ``Σ_j H_jj (w_j − Q(w_j))²``.
The layers are visited in graph order in ``rounds`` chunks; each chunk's ``X`` comes from the
model with every earlier chunk already rounded and all activation quantizers on, so later layers
correct what earlier ones could not.

Rows with at most ``exhaustive_max_columns`` taps (a depthwise 3x3 kernel: 9) are too short for
the error feedback to help much; for them :func:`search_round` tries every floor/ceil pattern
at every shrink scale and keeps the least ``dᵀ H d``, the exact optimum over those roundings.

With ``compensate_inputs`` the target is the float layer on the float model's inputs
``X_fp``, not the float weight on the quantized inputs ``X_q`` (as in GPTAQ: Li, Yin, Frantar,
Alistarh & Panda, "GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric Calibration",
ICML 2025). The least-squares fit splits exactly::

    ‖Ŵ X_q − W X_fp‖² = ‖(Ŵ − W*) X_q‖² + const,   W* = W X_fp X_qᵀ (X_q X_qᵀ)⁻¹

so GPTQ rounds ``W*`` (ridge-damped towards ``W``, see :meth:`_Layer.compensated_weight`)
against the same ``H``: the weights absorb the error of their own input quantizer and of every
layer before them. At 4-bit activations that error dominates. Layers are then rounded one at a
time (each fit on the inputs the rounded layers before it give), and only where the calibration
set has ``compensate_min_samples`` rows of ``X`` per column (a classifier head sees one per
image and keeps plain GPTQ).

The rounded weight ``Ŵ`` is stored as a new float constant whose values lie exactly on the
weight quantizer's grid (the quantizer gets the chosen scale), so the graph, exporters and the
integer backends see an ordinary per-channel weight. Invariants checked by the tests: each
layer's output error ``‖Ŵ X − W X‖`` on calibration data is below round-to-nearest's; the
exact search leaves less error than GPTQ on depthwise kernels and never more than
round-to-nearest; ``W*`` is the least-squares solution and beats ``W`` on unseen noisy inputs;
the compensated pass lowers the logit error at 4-bit activations; stepping the model layer by
layer gives each layer the inputs a full run gives.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx
from tqdm.auto import tqdm

from hyq_fx.pass_base import (
    HyqPass,
    PassError,
    PassResult,
    add_constant,
    check_bits_option,
    first_images,
    get_tensor,
    prune_unused_attributes,
    register_pass,
)
from hyq_fx.quantizer import FakeQuantizer
from hyq_fx.vocabulary import quantizer_of, quantizers_mode

aten = torch.ops.aten
WEIGHTED_OPS = (aten.conv2d.default, aten.linear.default)


class _Layer:
    """One conv/linear whose weight quantizer GPTQ rewrites, with its Hessian(s)."""

    def __init__(self, gm: fx.GraphModule, op: fx.Node) -> None:
        self.op = op
        self.fq_node = op.args[1]
        self.fq: FakeQuantizer = gm.get_submodule(self.fq_node.target)
        self.weight_node = self.fq_node.args[0]
        self.weight = get_tensor(gm, self.weight_node).detach().float()
        conv = op.target is aten.conv2d.default
        args = list(op.args) + [None] * (7 - len(op.args))
        self.stride, self.padding, self.dilation = args[3] or 1, args[4] or 0, args[5] or 1
        self.groups = (args[6] or 1) if conv else 1
        self.conv = conv
        cols = self.weight[0].numel()
        self.hessian = torch.zeros(self.groups, cols, cols, dtype=torch.float64)
        self.cross: torch.Tensor | None = None  # Σ X_fp X_qᵀ, with compensate_inputs
        self.count = 0
        self.rounded: torch.Tensor | None = None  # Ŵ, once rounded (None: round-to-nearest)

    def columns(self, x: torch.Tensor) -> torch.Tensor:
        """The op's input as columns ``[groups, cols, N]`` (unfolded for a conv)."""
        if not self.conv:
            return x.reshape(-1, x.shape[-1]).t().unsqueeze(0)
        kh, kw = self.weight.shape[-2:]
        if isinstance(self.padding, str):
            raise PassError(
                f"round_weights_gptq: {self.op.name} uses padding={self.padding!r}; "
                "only explicit padding is supported (leave this layer out with skip=[...])"
            )
        cols = F.unfold(x, (kh, kw), self.dilation, self.padding, self.stride)  # [B, C*k*k, L]
        cols = cols.reshape(x.shape[0], self.groups, -1, cols.shape[-1])
        return cols.permute(1, 2, 0, 3).reshape(self.groups, cols.shape[2], -1)

    def add(self, x: torch.Tensor, x_float: torch.Tensor | None = None) -> None:
        cols = self.columns(x.detach().float())
        self.hessian += (cols @ cols.transpose(1, 2)).double()
        if x_float is not None:
            cross = (self.columns(x_float.detach().float()) @ cols.transpose(1, 2)).double()
            self.cross = cross if self.cross is None else self.cross + cross
        self.count += cols.shape[-1]

    def compensated_weight(self, damp: float) -> torch.Tensor:
        """The float weight ``W*`` [groups, O/groups, D] whose output on the quantized inputs
        best matches the float layer on the float inputs (ridge-damped towards ``W``)::

            W* = argmin_V ‖V X_q − W X_fp‖² + λ‖V − W‖²  =  W (M + λI)(H + λI)⁻¹,
            H = X_q X_qᵀ,  M = X_fp X_qᵀ
        """
        w = self.weight.reshape(self.groups, -1, self.weight[0].numel()).double()
        h = self.hessian / max(self.count, 1)
        m = self.cross / max(self.count, 1)
        eye = torch.eye(h.shape[-1], dtype=h.dtype)
        lam = damp * torch.diagonal(h, dim1=1, dim2=2).mean(1).clamp_min(1e-12)[:, None, None]
        # (H + λI) W*ᵀ = (M + λI)ᵀ Wᵀ, H symmetric
        rhs = (m + lam * eye).transpose(1, 2) @ w.transpose(1, 2)
        return torch.linalg.solve(h + lam * eye, rhs).transpose(1, 2).float()


def _quantize_rows(w: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale), qmin, qmax) * scale


def _shrink_factors(grid: int) -> list[float]:
    """The clipping factors ``α`` in (0.5, 1] that the scale searches try, widest first."""
    return torch.linspace(1.0, 0.5, grid).tolist()


def _shrink_scales(
    w: torch.Tensor, diag: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, grid: int
) -> torch.Tensor:
    """Per row, the scale ``α·s`` (α in (0.5, 1]) with the least diag(H)-weighted error."""
    best, best_err = scale.clone(), torch.full_like(scale, math.inf)
    for alpha in _shrink_factors(grid):
        s = scale * alpha
        err = ((w - _quantize_rows(w, s[:, None], qmin, qmax)).square() * diag).sum(1)
        better = err < best_err
        best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


EXHAUSTIVE_MAX_COLUMNS = 10  # 2^10 floor/ceil patterns per row and scale candidate


def search_round(
    w: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, grid: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rounding of each row of ``w`` [O, D] (D small, e.g. a depthwise 3x3 kernel) with
    the least ``dᵀ H d`` among every floor/ceil pattern and every scale ``α·s`` (α on the
    shrink grid): the exact optimum of GPTQ's objective over those roundings, which the greedy
    column order only approximates. Returns ``(rounded weight, per-row scale)``."""
    w, h = w.double(), hessian.double()
    d = w.shape[1]
    patterns = ((torch.arange(1 << d)[:, None] >> torch.arange(d)) & 1).double()  # [2^D, D]
    best_q, best_s = torch.zeros_like(w), scale.double().clone()
    best_err = torch.full((w.shape[0],), math.inf, dtype=torch.float64)
    for alpha in _shrink_factors(grid):
        s = scale.double() * alpha
        low = torch.floor(w / s[:, None])
        cand = torch.clamp(low[:, None, :] + patterns[None], qmin, qmax) * s[:, None, None]
        diff = cand - w[:, None, :]  # [O, K, D]
        err = torch.einsum("okd,de,oke->ok", diff, h, diff)
        err, k = err.min(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_q = torch.where(better[:, None], cand[torch.arange(len(k)), k], best_q)
    return best_q, best_s


def gptq_round(
    w: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    qmin: int,
    qmax: int,
    damp: float = 0.01,
    act_order: bool = True,
) -> torch.Tensor:
    """GPTQ-round the rows of ``w`` [O, D] with per-row ``scale`` against ``hessian`` [D, D].

    Returns the rounded weight (values on the grid ``scale · [qmin, qmax]``).
    """
    w = w.double().clone()
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(len(h))
    w, h = w[:, order], h[order][:, order]
    h += torch.eye(len(h), dtype=h.dtype) * damp * torch.diag(h).mean()
    try:
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        return _quantize_rows(w, scale[:, None].double(), qmin, qmax)[:, torch.argsort(order)]
    s = scale.double()
    q = torch.zeros_like(w)
    for j in range(w.shape[1]):
        q[:, j] = torch.clamp(torch.round(w[:, j] / s), qmin, qmax) * s
        err = (w[:, j] - q[:, j]) / u[j, j]
        w[:, j + 1 :] -= err[:, None] * u[j, j + 1 :][None, :]
    return q[:, torch.argsort(order)]


@register_pass
class RoundWeightsGPTQ(HyqPass):
    """GPTQ: round conv/linear weights column by column, feeding each error forward (Hessian)."""

    name = "round_weights_gptq"

    def __init__(
        self,
        ctx=None,
        *,
        rounds: int = 4,
        damp: float = 0.01,
        shrink_grid: int = 20,
        act_order: bool = True,
        images: int = 128,
        exhaustive_max_columns: int = 0,
        exhaustive_max_bits: int | None = None,
        exhaustive_min_activation_bits: int | None = None,
        compensate_inputs: bool = False,
        compensate_min_samples: int = 16,
    ) -> None:
        super().__init__(ctx)
        if rounds < 1 or images < 1 or shrink_grid < 1:
            raise PassError("round_weights_gptq: rounds, images and shrink_grid must be >= 1")
        if not 0 <= damp < 1:
            raise PassError(f"round_weights_gptq: damp={damp} must be in [0, 1)")
        self.rounds, self.damp, self.grid = rounds, damp, shrink_grid
        columns = exhaustive_max_columns
        if not isinstance(columns, int) or not 0 <= columns <= EXHAUSTIVE_MAX_COLUMNS:
            raise PassError(
                f"round_weights_gptq: exhaustive_max_columns={exhaustive_max_columns} must be "
                f"in [0, {EXHAUSTIVE_MAX_COLUMNS}] (2^D roundings are tried per row)"
            )
        self.act_order, self.images = act_order, images
        max_bits = check_bits_option(self.name, "exhaustive_max_bits", exhaustive_max_bits)
        min_act = check_bits_option(
            self.name, "exhaustive_min_activation_bits", exhaustive_min_activation_bits
        )
        # the search only at the bit widths where it was measured to pay (see the docs page)
        searched = (max_bits is None or self.ctx.w_bits <= max_bits) and (
            min_act is None or self.ctx.a_bits >= min_act
        )
        self.exhaustive = exhaustive_max_columns if searched else 0
        if compensate_min_samples < 1:
            raise PassError(
                f"round_weights_gptq: compensate_min_samples={compensate_min_samples} must be "
                ">= 1 (calibration samples per weight column)"
            )
        if not isinstance(compensate_inputs, bool):
            raise PassError(
                f"round_weights_gptq: compensate_inputs={compensate_inputs!r} must be true or false"
            )
        self.compensate = compensate_inputs
        self.min_samples = compensate_min_samples

    def requires(self, gm: fx.GraphModule) -> None:
        if not self.ctx.calib_batches:
            raise PassError("round_weights_gptq: needs calibration images")
        for op in self._ops(gm):
            if not gm.get_submodule(op.args[1].target).calibrated:
                raise PassError(
                    f"round_weights_gptq: the weight quantizer of {op.name} is not calibrated; "
                    "run `calibrate` before this pass"
                )

    @staticmethod
    def _ops(gm: fx.GraphModule) -> list[fx.Node]:
        ops = []
        for op in gm.graph.nodes:
            if op.op != "call_function" or op.target not in WEIGHTED_OPS or len(op.args) < 2:
                continue
            fq = op.args[1]
            mod = quantizer_of(gm, fq)
            if (
                mod is not None
                and mod.role == "weight"
                and mod.spec.symmetric
                and (mod.spec.per_channel is False or mod.spec.axis == 0)
                and fq.args[0].op == "get_attr"
            ):
                ops.append(op)
        return ops

    def _collect(self, gm: fx.GraphModule, layers: list[_Layer]) -> None:
        by_op = {layer.op: layer for layer in layers}

        class _Hessians(fx.Interpreter):
            def run_node(self, n: fx.Node):
                if n in by_op:
                    by_op[n].add(self.env[n.args[0]])
                return super().run_node(n)

        with torch.no_grad():
            for batch in first_images(self.ctx.calib_batches, self.images):
                _Hessians(gm).run(batch)

    def _round(self, gm: fx.GraphModule, layer: _Layer) -> dict:
        spec, fq = layer.fq.spec, layer.fq
        out_ch = layer.weight.shape[0]
        w_float = layer.weight.reshape(layer.groups, out_ch // layer.groups, -1)
        scale = fq.scale.reshape(-1).float()
        scale = scale.expand(out_ch).reshape(layer.groups, -1) if scale.numel() > 1 else scale
        hess = layer.hessian / max(layer.count, 1)
        compensated = layer.cross is not None and layer.count >= self.min_samples * w_float.shape[2]
        w = layer.compensated_weight(self.damp) if compensated else w_float
        target_scale = scale
        if compensated:  # the grid must cover W*, whose range can exceed W's
            amax = w.abs().amax(-1) if spec.per_channel else w.abs().amax()
            target_scale = torch.maximum(scale, amax / spec.qmax)
        rounded, new_scale = torch.empty_like(w), []
        err_rtn = err_gptq = 0.0
        searched = spec.per_channel and w.shape[2] <= self.exhaustive
        for g in range(layer.groups):
            s = target_scale[g] if target_scale.dim() == 2 else target_scale.expand(w.shape[1])
            if searched:
                q, s = search_round(w[g], hess[g], s, spec.qmin, spec.qmax, self.grid)
                s = s.float()
            else:
                if spec.per_channel:
                    diag = torch.diag(hess[g]).float()
                    s = _shrink_scales(w[g], diag, s, spec.qmin, spec.qmax, self.grid)
                q = gptq_round(w[g], hess[g], s, spec.qmin, spec.qmax, self.damp, self.act_order)
            rounded[g] = q.float()
            new_scale.append(s)
            rtn = _quantize_rows(  # round-to-nearest of the original weight
                w_float[g], scale[g][:, None] if scale.dim() == 2 else scale, spec.qmin, spec.qmax
            )
            for name, cand in (("rtn", rtn), ("gptq", q.float())):
                d = (cand - w[g]).double()
                e = float(torch.einsum("od,de,oe->", d, hess[g], d))
                if name == "rtn":
                    err_rtn += e
                else:
                    err_gptq += e
        if err_gptq > err_rtn:  # never worse than round-to-nearest on the calibration data
            return {"layer": layer.op.name, "kept": "round-to-nearest", "err": err_rtn}
        if not spec.per_channel and compensated:
            fq.set_qparams(target_scale.reshape(-1)[:1], fq.zero_point)
        weight = rounded.reshape(layer.weight.shape)
        layer.rounded = weight
        const = add_constant(gm, f"{layer.weight_node.target}_gptq", weight, layer.fq_node)
        layer.fq_node.replace_input_with(layer.weight_node, const)
        if spec.per_channel:
            fq.set_qparams(torch.cat(new_scale), torch.zeros(out_ch))
        return {
            "layer": layer.op.name,
            "rounding": "search" if searched else "gptq",
            "compensated": compensated,
            "err_rtn": err_rtn,
            "err_gptq": err_gptq,
            "gain_db": 10 * math.log10(max(err_rtn, 1e-30) / max(err_gptq, 1e-30)),
        }

    def call(self, gm: fx.GraphModule) -> PassResult:
        ops = self._ops(gm)
        if not ops:
            return PassResult(gm, False)
        records = []
        bar = tqdm(total=len(ops), desc="gptq", disable=not self.ctx.progress, leave=False)
        if self.compensate:
            records = self._round_sequentially(gm, ops, bar)
        else:
            chunk = math.ceil(len(ops) / self.rounds)
            for start in range(0, len(ops), chunk):
                layers = [_Layer(gm, op) for op in ops[start : start + chunk]]
                self._collect(gm, layers)
                for layer in layers:
                    records.append(self._round(gm, layer))
                    bar.update()
        bar.close()
        prune_unused_attributes(gm)
        gm.recompile()
        self.ctx.log.append({"pass": self.name, "layers": records})
        return PassResult(gm, True)

    def _round_sequentially(self, gm: fx.GraphModule, ops: list[fx.Node], bar) -> list[dict]:
        """Round one layer at a time, each fitted on the inputs the layers before it (already
        rounded) give it. A chunk of layers would not do: a corrected producer changes the
        inputs its consumer's ``W*`` was fitted to correct, and the correction counts twice.
        Both models are stepped forward node by node over the calibration batches (one
        forward pass each in all), the float one with every quantizer off."""
        batches = first_images(self.ctx.calib_batches, self.images)
        quant = _Stepper(gm, batches)
        float_ = _Stepper(gm, batches)
        records = []
        with torch.no_grad():
            for op in ops:
                layer = _Layer(gm, op)
                with quantizers_mode(gm, "off"):
                    x_fp = float_.inputs_of(op)
                for x_q, x_f in zip(quant.inputs_of(op), x_fp, strict=True):
                    layer.add(x_q, x_f)
                records.append(self._round(gm, layer))
                if layer.rounded is not None:  # Ŵ lies on its grid: Q(Ŵ) = Ŵ
                    quant.weights[op] = layer.rounded
                bar.update()
        return records


class _Stepper:
    """``gm`` run node by node over a list of batches, up to a given op and no further.

    Values are kept only while a later node still needs them. ``weights[op]`` replaces the
    (quantized) weight that ``op`` reads: the pass rounds a layer once its inputs are known,
    after its weight quantizer has already run.
    """

    def __init__(self, gm: fx.GraphModule, batches: list[torch.Tensor]) -> None:
        self.nodes = [n for n in gm.graph.nodes if n.op != "output"]
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.interpreters = []
        for batch in batches:
            interp = fx.Interpreter(gm)
            interp.args_iter = iter([batch])
            self.interpreters.append(interp)
        self.pos = 0
        self.weights: dict[fx.Node, torch.Tensor] = {}

    def inputs_of(self, op: fx.Node) -> list[torch.Tensor]:
        """Run every node before ``op``; return ``op``'s first input, one per batch."""
        stop = self.index[op]
        while self.pos < stop:
            node = self.nodes[self.pos]
            for interp in self.interpreters:
                if node in self.weights:
                    interp.env[node.args[1]] = self.weights[node]
                interp.env[node] = interp.run_node(node)
                for dead in interp.user_to_last_uses.get(node, []):  # fx's own liveness map
                    del interp.env[dead]
            self.pos += 1
        return [interp.env[op.args[0]] for interp in self.interpreters]
