"""TVM backend, torch side: FakeQuantizers as explicit int8 quantize / dequantize ops, and the
import of the graph into TVM Relax.

1. ``lower_quantizers`` (torch): every ``FakeQuantizer`` becomes explicit ATen ops with an int8
   tensor in the middle. Activations (per-tensor or per-channel, ``b ≤ 8`` bits) are *shifted*
   to signed int8, which is exact for integers::

       q8 = cast_int8(clamp(round(x / s) + z', qmin − o, qmax − o)),   z' = z − o
       x̂  = (cast_f32(q8) − z') · s

   with ``o = 2^(b−1)`` for the unsigned (asymmetric) range and ``o = 0`` for the symmetric one,
   so ``x̂`` equals ``FakeQuantizer(x)`` bit for bit. Weights are quantized once, offline, to
   the int8 constant ``w8 = clamp(round(W/s_w) + z_w, qmin, qmax) − z_w``;
   ``Ŵ = (cast_f32(w8) − 0)·s_w``.
2. ``import_relax``: ``from_exported_program`` imports the exported graph; the dequantize
   ``(cast_f32(q) − z)·s`` is then the Relax pattern ``multiply(subtract(astype(q), const),
   const)``, which ``IntegerizeQDQ`` (:mod:`~hyq_fx.backends.tvm_integerize`) matches.

A 1x1 conv after ``scale_bottleneck_outliers`` (placement "quantizer") reads
``Q_a(x; s·α_c, z)`` against the weight ``Q_w(W·α)·α⁻¹``: the α cancel in the integer sum, so
``lower_quantizers`` drops the ``·α⁻¹`` product and dequantizes the per-channel codes with the one
scale ``s`` (``_fold_channel_scaled_inputs``), and the conv is an ordinary int8 conv.

Quantizers that cannot be held in int8 (> 8-bit codes, weights whose ``q − z_w`` leaves int8,
an activation whose input rank is unknown) keep their float fake-quant, and the op they feed
stays in float; quantizers in mode ``off`` / ``observe`` are the identity and are removed.
Per-channel activation quantizers (≤ 8 bits) are lowered to int8 codes either way; their Q/DQ is
exact. Invariant checked by ``tests/test_tvm_backend.py``: the lowered module's outputs equal the
fake-quant module's, to the bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from hyq_fx.backends.tvm_runner import TvmBackendError
from hyq_fx.quantizer import FakeQuantizer

INT8_MIN, INT8_MAX = -128, 127


# ---------------------------------------------------------------------------------------------
# 1. torch: FakeQuantizer → explicit int8 quantize / dequantize


def _channel_shape(numel: int, ndim: int, axis: int) -> list[int]:
    shape = [1] * ndim
    shape[axis % ndim] = numel
    return shape


class _QuantDequantInt8(nn.Module):
    """``x → (cast_f32(cast_i8(clamp(round(x/s) + z', lo, hi))) − z')·s``.

    ``s`` and ``z'`` are per-tensor (``shape=()``) or per-channel, stored already in their
    broadcast shape (e.g. ``[C, 1, 1]`` for axis 1 of NCHW) so that Relax sees them as plain
    constants of the dequantize pattern, not behind a reshape.
    """

    def __init__(
        self,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        lo: int,
        hi: int,
        shape: tuple[int, ...] = (),
        dequant_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("scale", scale.reshape(shape).float().clone())
        zero_shape = shape if zero_point.numel() > 1 else ()
        self.register_buffer("zero_point", zero_point.reshape(zero_shape).float().clone())
        # the codes of a per-channel scale s_c folded into the consumer: read through one s̄
        dq = self.scale if dequant_scale is None else torch.tensor(float(dequant_scale))
        self.register_buffer("dequant_scale", dq.clone())
        self.lo, self.hi = float(lo), float(hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(x / self.scale) + self.zero_point, self.lo, self.hi)
        q8 = q.to(torch.int8)
        return (q8.to(torch.float32) - self.zero_point) * self.dequant_scale


class _DequantWeightInt8(nn.Module):
    """A weight stored as int8 codes: ``Ŵ = (cast_f32(w8) − 0)·s_w``."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("scale", scale.float().clone())
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.float32))

    def forward(self) -> torch.Tensor:
        return (self.codes.to(torch.float32) - self.zero_point) * self.scale


def _get_attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _weight_codes(fq: FakeQuantizer, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(q − z_w, scale view)`` as exact integers in int8, or None if they leave int8."""
    spec = fq.spec
    w = w.detach().float()
    if fq.scale.numel() > 1:
        shape = _channel_shape(fq.scale.numel(), w.dim(), spec.axis)
    else:
        shape = []
    s = fq.scale.reshape(shape)
    z = fq.zero_point.reshape(shape)
    codes = torch.clamp(torch.round(w / s) + z, spec.qmin, spec.qmax) - z
    if codes.numel() and (codes.min() < INT8_MIN or codes.max() > INT8_MAX):
        return None
    return codes, s


_INPUT_RANKS = {torch.ops.aten.conv2d.default: 4, torch.ops.aten.conv1d.default: 3}


def _input_rank(node: fx.Node) -> int | None:
    """The rank of a quantizer's input: from ``meta["val"]`` (a captured graph) or, where that
    is gone (a graph loaded from ``graph.json``), from a conv consuming it as its input."""
    for n in (node, node.args[0]):
        val = n.meta.get("val") if isinstance(n, fx.Node) else None
        if getattr(val, "ndim", None) is not None:
            return int(val.ndim)
    for user in node.users:
        if user.op == "call_function" and user.args and user.args[0] is node:
            rank = _INPUT_RANKS.get(user.target)
            if rank is not None:
                return rank
    return None


def _activation_qparam_shape(fq: FakeQuantizer, node: fx.Node) -> tuple[int, ...] | None:
    """The broadcast shape of an activation quantizer's scale / zero point, or None.

    ``()`` per-tensor; per-channel along ``axis``: ``[C] + [1]·(trailing dims)``, which needs
    the input's rank for a non-negative axis (:func:`_input_rank`).
    """
    numel = fq.scale.numel()
    if fq.zero_point.numel() not in (1, numel):
        return None
    if numel == 1 and fq.zero_point.numel() == 1:
        return ()
    axis = fq.spec.axis
    if axis < 0:
        return (numel, *([1] * (-axis - 1)))
    rank = _input_rank(node)
    if rank is None or axis >= rank:
        return None
    return (numel, *([1] * (rank - 1 - axis)))


def _fold_channel_scaled_inputs(gm: fx.GraphModule) -> dict[fx.Node, float]:
    """Per-channel activation quantizers whose scale cancels in their 1x1-conv consumers.

    After ``scale_bottleneck_outliers`` (placement "quantizer") a conv reads
    ``conv(Q_a(x; s·α_c, z), Q_w(W·α)·α⁻¹)``. The integer codes of ``Q_a`` times ``s·α_c``,
    against ``α⁻¹``, are the codes times ``s``: so where every consumer multiplies its
    quantized weight by a constant ``r`` with ``r_c·s_c = s̄`` for all ``c`` (and ``z`` is one
    value), the ``·r`` is dropped here and the quantizer's codes are dequantized with ``s̄``;
    ``IntegerizeQDQ`` then sees a per-tensor input and runs an int8 conv. Returns
    ``{quantizer node: s̄}``; the graph is rewritten in place (``gm`` is the caller's copy).
    """
    folded: dict[fx.Node, float] = {}
    for node in gm.graph.nodes:
        fq = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(fq, FakeQuantizer) or fq.mode != "quantize" or not fq.spec.per_channel:
            continue
        if fq.role == "weight" or fq.spec.axis % 4 != 1 or fq.zero_point.unique().numel() != 1:
            continue
        sigma = fq.scale.detach().double().flatten()
        muls, s_bar = [], None
        for user in node.users:
            w = user.args[1] if user.target is torch.ops.aten.conv2d.default else None
            if user.args[0] is not node or not isinstance(w, fx.Node):
                break
            if w.target is not torch.ops.aten.mul.Tensor or len(w.users) != 1:
                break
            wfq, r = w.args
            if not (isinstance(wfq, fx.Node) and wfq.op == "call_module"):
                break
            if not (isinstance(r, fx.Node) and r.op == "get_attr"):
                break
            ratio = _get_attr(gm, r.target).detach().double().flatten() * sigma
            if ratio.numel() != sigma.numel():
                break
            value = float(ratio.mean())
            if (ratio / value - 1).abs().max() > 1e-5 or (s_bar and abs(value / s_bar - 1) > 1e-5):
                break
            s_bar = value
            muls.append((user, w, wfq))
        else:
            if not muls:
                continue
            for user, mul, wfq in muls:
                user.replace_input_with(mul, wfq)
                gm.graph.erase_node(mul)
            folded[node] = s_bar
    return folded


def lower_quantizers(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, list[str]]]:
    """A copy of ``gm`` whose FakeQuantizers are explicit int8 quantize/dequantize ATen ops.

    Returns the new GraphModule (same outputs as ``gm``, to the bit) and what was done with each
    quantizer: names under ``int8_activation``, ``int8_weight``, ``float`` and ``identity``.
    Quantizers that cannot be held in int8 keep their float fake-quant (the consumer op then
    stays in float); quantizers in mode ``off``/``observe`` are the identity and are removed.
    """
    gm = fx.GraphModule(gm, gm.graph.__deepcopy__(), class_name=type(gm).__name__)
    report: dict[str, list[str]] = {"int8_activation": [], "int8_weight": [], "float": [],
                                    "identity": [], "channel_folded": []}  # fmt: skip
    graph = gm.graph
    folded = _fold_channel_scaled_inputs(gm)
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        fq = gm.get_submodule(node.target)
        if not isinstance(fq, FakeQuantizer) or type(fq).forward is not FakeQuantizer.forward:
            continue  # another module (a custom quantizer): torch.export traces it in float
        name = str(node.target)
        if fq.mode != "quantize":
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            report["identity"].append(name)
            continue
        spec = fq.spec
        src = node.args[0]
        if isinstance(src, fx.Node) and src.op == "get_attr":
            lowered = _weight_codes(fq, _get_attr(gm, src.target))
            if lowered is not None:
                new_name = f"{name.replace('.', '_')}_int8"
                gm.add_submodule(new_name, _DequantWeightInt8(*lowered))
                with graph.inserting_before(node):
                    new = graph.call_module(new_name, ())
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                report["int8_weight"].append(name)
                continue
        shape = _activation_qparam_shape(fq, node)
        if spec.bits <= 8 and shape is not None:
            offset = 0 if spec.symmetric else 2 ** (spec.bits - 1)
            zero = fq.zero_point - offset
            if node in folded:
                zero = zero.flatten()[:1].reshape(())
                report["channel_folded"].append(name)
            module = _QuantDequantInt8(
                fq.scale, zero, spec.qmin - offset, spec.qmax - offset, shape, folded.get(node)
            )
            gm.add_submodule(name, module)
            report["int8_activation"].append(name)
        else:
            report["float"].append(name)  # > 8 bits / unknown rank: float fake-quant
    graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, report


# ---------------------------------------------------------------------------------------------
# 2. import into Relax


def import_relax(
    gm: fx.GraphModule, example_input: torch.Tensor, *, dynamic_batch: bool = True
) -> Any:
    """Export ``gm`` with torch.export and import it as a Relax IRModule (``main``).

    PyTorch's decompositions are not run (``run_ep_decomposition=False``): they would turn
    ``matmul``/``linear`` into ``broadcast_to``/``reshape``/``bmm`` chains that hide the
    dequantize → matmul pattern from ``IntegerizeQDQ``.
    """
    from tvm.relax.frontend.torch import from_exported_program

    dynamic = None
    if dynamic_batch:
        dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    example = example_input
    if dynamic_batch and example.shape[0] < 2:  # a batch of one would specialise the dimension
        example = example.repeat(2, *([1] * (example.dim() - 1)))
    try:
        with torch.no_grad():
            ep = torch.export.export(gm, (example,), dynamic_shapes=dynamic, strict=False)
        return from_exported_program(ep, run_ep_decomposition=False)
    except Exception as exc:
        raise TvmBackendError(
            f"could not import the model into TVM Relax: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:400]} (check that the graph runs on "
            f"example_input of shape {tuple(example_input.shape)}; an unsupported op is named "
            "above)"
        ) from exc
