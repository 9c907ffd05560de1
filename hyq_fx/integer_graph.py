"""The integer graph: a fake-quant GraphModule as quantize / dequantize ops with integer weights.

Every calibrated :class:`~hyq_fx.quantizer.FakeQuantizer` ``Q`` (scale ``s``, zero-point ``z``,
codes in ``[qmin, qmax]``, ``b ≤ 8`` bits) becomes torch's ``quantized_decomposed`` ops, the form
PT2E's ``convert`` emits and ``torch.onnx`` translates to ``QuantizeLinear`` /
``DequantizeLinear``. Codes live in the 8-bit container that holds ``[qmin, qmax]``: ``uint8``
for the asymmetric range ``[0, 2^b − 1]``, ``int8`` for the symmetric ``±(2^(b−1) − 1)``::

    activation, per-tensor:   x̂ = DQ(Q(clamp(x, (qmin − z)·s, (qmax − z)·s), s, z), s, z)
    activation, per-channel:  x̂ = DQ_c(Q_c(x, s_c, z_c, axis), s_c, z_c, axis)
    weight:                   Ŵ = DQ(W_q, s, z),   W_q = clamp(round(W / s) + z, qmin, qmax)

``W_q`` is computed here, once, and stored as an integer buffer. The float clamp before a
per-tensor ``Q`` is written only where ``[qmin, qmax]`` is narrower than the container
(symmetric 8-bit, or ``b < 8``): ONNX's ``QuantizeLinear`` saturates to the container, and
``clamp`` then ``round(·/s) + z`` gives the codes of ``clamp(round(x/s) + z, qmin, qmax)``
because both maps are monotonic. A per-channel ``Q_c`` clamps to ``[qmin, qmax]`` itself.

Quantizers in mode ``off`` are the identity; quantizers of more than 8 bits keep their float
fake-quant (``torch.export`` traces it as ATen arithmetic); a quantizer still in mode
``observe`` is an error (calibrate first).

Invariant checked by ``tests/test_integer_graph.py``: on the same inputs the integer graph
gives the fake-quant graph's codes, except where ``x/s`` lies within float rounding of a
``.5`` boundary (torch's reference ``quantize_per_tensor`` multiplies by ``1/s``; ONNX and the
fake-quant divide), and its weight buffers are integers in ``[qmin, qmax]``.
"""

from __future__ import annotations

import copy

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)
from torch import fx

from .lowering import lower_for_export
from .quantizer import FakeQuantizer

__all__ = ["IntegerGraphError", "integer_graph", "code_dtype"]

qd = torch.ops.quantized_decomposed


class IntegerGraphError(ValueError):
    """A fake-quant graph that cannot be written as integer quantize / dequantize ops."""


def code_dtype(qmin: int, qmax: int) -> torch.dtype | None:
    """The 8-bit container of codes in ``[qmin, qmax]`` (None: they need more than 8 bits)."""
    for dtype in (torch.uint8, torch.int8):
        info = torch.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return dtype
    return None


def _channel_view(values: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def _weight_codes(fq: FakeQuantizer, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``W_q = clamp(round(W / s) + z, qmin, qmax)`` in ``dtype``."""
    spec, w = fq.spec, weight.detach().float()
    s, z = fq.scale.detach().float(), fq.zero_point.detach().float()
    if s.numel() > 1:
        s, z = (_channel_view(t, w.dim(), spec.axis % w.dim()) for t in (s, z))
    return torch.clamp(torch.round(w / s) + z, spec.qmin, spec.qmax).to(dtype)


def _rank(node: fx.Node) -> int | None:
    for n in (node, *node.all_input_nodes):
        val = n.meta.get("val", n.meta.get("tensor_meta"))
        if getattr(val, "shape", None) is not None:
            return len(val.shape)
    return None


class _Writer:
    """Writes one quantizer's integer ops in front of its node; owns the new buffers' names."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.graph = gm.graph

    def buffer(self, stem: str, value: torch.Tensor) -> fx.Node:
        name, i = f"{stem.replace('.', '_')}", 0
        while hasattr(self.gm, name):
            i += 1
            name = f"{stem.replace('.', '_')}_{i}"
        self.gm.register_buffer(name, value.detach().clone())
        return self.graph.get_attr(name)

    def weight(self, node: fx.Node, fq: FakeQuantizer, dtype: torch.dtype) -> fx.Node:
        w = _get_attr(self.gm, str(node.args[0].target))
        codes = self.buffer(f"{node.target}.codes", _weight_codes(fq, w, dtype))
        spec = fq.spec
        if fq.scale.numel() > 1:
            scale = self.buffer(f"{node.target}.scale", fq.scale.float())
            zero = self.buffer(f"{node.target}.zero_point", fq.zero_point.round().long())
            args = (codes, scale, zero, spec.axis % w.dim(), spec.qmin, spec.qmax, dtype)
            return self.graph.call_function(qd.dequantize_per_channel.default, args)
        args = (codes, *_per_tensor(fq), spec.qmin, spec.qmax, dtype)
        return self.graph.call_function(qd.dequantize_per_tensor.default, args)

    def activation(self, node: fx.Node, fq: FakeQuantizer, dtype: torch.dtype) -> fx.Node:
        x, spec = node.args[0], fq.spec
        if fq.scale.numel() > 1:
            axis = spec.axis
            if axis < 0:
                rank = _rank(node)
                if rank is None:
                    raise IntegerGraphError(
                        f"quantizer {node.target}: per-channel axis {axis} of an input of "
                        "unknown rank; pass example_input so that shapes can be found"
                    )
                axis %= rank
            scale = self.buffer(f"{node.target}.scale", fq.scale.float())
            zero = self.buffer(f"{node.target}.zero_point", fq.zero_point.round().long())
            qargs = (scale, zero, axis, spec.qmin, spec.qmax, dtype)
            q = self.graph.call_function(qd.quantize_per_channel.default, (x, *qargs))
            return self.graph.call_function(qd.dequantize_per_channel.default, (q, *qargs))
        s, z = _per_tensor(fq)
        info = torch.iinfo(dtype)
        if spec.qmin > info.min or spec.qmax < info.max:
            bounds = ((spec.qmin - z) * s, (spec.qmax - z) * s)
            x = self.graph.call_function(torch.ops.aten.clamp.default, (x, *bounds))
        qargs = (s, z, spec.qmin, spec.qmax, dtype)
        q = self.graph.call_function(qd.quantize_per_tensor.default, (x, *qargs))
        return self.graph.call_function(qd.dequantize_per_tensor.default, (q, *qargs))


def _per_tensor(fq: FakeQuantizer) -> tuple[float, int]:
    return float(fq.scale.reshape(-1)[0]), int(round(float(fq.zero_point.reshape(-1)[0])))


def _get_attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _drop_unread_attributes(gm: fx.GraphModule, targets: set[str]) -> None:
    """Delete the float weights now read only through their integer codes."""
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for target in sorted(targets - read):
        owner, _, name = target.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        if name in module._parameters or name in module._buffers:
            delattr(module, name)


def _quantizer(gm: fx.GraphModule, node: fx.Node) -> FakeQuantizer | None:
    if node.op != "call_module":
        return None
    module = gm.get_submodule(str(node.target))
    return module if isinstance(module, FakeQuantizer) else None


def integer_graph(gm: fx.GraphModule, example_input: torch.Tensor | None = None) -> fx.GraphModule:
    """A new GraphModule computing ``gm`` with integer quantize / dequantize ops (see above).

    ``gm`` is not modified. ``example_input`` (one image batch) lets graphs without recorded
    shapes (loaded from an artifact) resolve ``channel_shuffle`` and negative channel axes.
    Returns a module whose remaining ``FakeQuantizer`` submodules are those above 8 bits.
    """
    for name, fq in gm.named_modules():
        if isinstance(fq, FakeQuantizer) and fq.mode == "observe":
            raise IntegerGraphError(
                f"quantizer {name} is still observing (not calibrated): run the 'calibrate' "
                "pass (hyq_fx.quantize does) before lowering to integers"
            )
    out = lower_for_export(gm, example_input)
    if out is gm:  # nothing lowered: the rewrite below must not touch the caller's module
        out = copy.deepcopy(gm)
    writer = _Writer(out)
    for node in list(out.graph.nodes):
        fq = _quantizer(out, node)
        if fq is None:
            continue
        if fq.mode == "off":
            node.replace_all_uses_with(node.args[0])
            out.graph.erase_node(node)
            continue
        dtype = code_dtype(fq.spec.qmin, fq.spec.qmax)
        if dtype is None:
            continue  # > 8 bits: the float fake-quant stays
        src = node.args[0]
        is_weight = isinstance(src, fx.Node) and src.op == "get_attr"
        with out.graph.inserting_before(node):
            new = (
                writer.weight(node, fq, dtype) if is_weight else writer.activation(node, fq, dtype)
            )
        new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        node.replace_all_uses_with(new)
        out.graph.erase_node(node)
    before = {str(n.target) for n in out.graph.nodes if n.op == "get_attr"}
    out.graph.eliminate_dead_code()
    _drop_unread_attributes(out, before)
    out.delete_all_unused_submodules()
    out.graph.lint()
    out.recompile()
    return out
