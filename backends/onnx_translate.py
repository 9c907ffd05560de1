"""The translator of the ONNX QDQ export: a lowered hyq-fx GraphModule → ONNX nodes, node by node.

The graph is translated node by node from the ATen graph (not re-traced), so export takes
seconds; shapes and input-independent constants come from :mod:`~hyq_fx.backends.onnx_record`
(the module run at two batch sizes). ``_Translator.run`` walks the nodes in order:

* an activation ``FakeQuantizer`` becomes a Q / DQ pair (``quantize_activation``, ``qdq``); a
  per-channel one writes its codes with a per-tensor QuantizeLinear,
  ``QuantizeLinear(x·(s̄/s_c) + (z_c − z̄)·s̄, s̄, z̄)`` (``codes``), and a per-axis
  DequantizeLinear;
* a weight quantizer becomes an int8 / uint8 initializer, emitted by its consumer behind a
  DequantizeLinear in the layout the consumer needs (``weight``, ``weight_dq``);
* parameters and subgraphs that do not depend on the input become initializers
  (``materialize``; a large constant that is constant along some axes is stored small and
  expanded, ``_broadcast_source``);
* any other op goes to its handler in the table of :mod:`~hyq_fx.backends.onnx_ops`.

Requantization (``requant_params``, ``sample_nodes``, ``residual_value``) follows the path
rules of :mod:`~hyq_fx.backends.onnx_requantize`. ``report`` records the requantized, float and
channel-folded convs for the file's metadata. An op without a handler, a quantizer that is not
calibrated or a value that is not a tensor is an ``ExportError`` naming the node.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from onnx import TensorProto
from torch import fx

from hyq_fx.quantizer import FakeQuantizer

# the handler modules register their ops in _HANDLERS when imported
from . import onnx_ops_conv, onnx_ops_math, onnx_ops_shape  # noqa: F401
from .onnx_builder import _Builder
from .onnx_ops import _HANDLERS, _SYM_OPS
from .onnx_qparams import (
    ExportError,
    _QParams,
    _qparams,
    _quantize_weight,
    _shared_scale_and_zero,
)
from .onnx_record import _is_fq, _where, getattr_path
from .onnx_requantize import (
    _EXACT_ACTS,
    _MOVES,
    _RESIDUAL,
    _SMOOTH_ACTS,
    MAX_ADDED_ERROR,
    _requant_range,
    _requant_range_per_channel,
    _residual_grid,
    _uint8_grid,
)

aten = torch.ops.aten


class _Translator:
    def __init__(
        self,
        gm: fx.GraphModule,
        shapes: dict,
        consts: dict,
        b: _Builder,
        *,
        requantize: str,
        ort_contrib_ops: bool = False,
        max_added_error: float = MAX_ADDED_ERROR,
    ) -> None:
        self.gm, self.shapes, self.consts, self.b = gm, shapes, consts, b
        self.requantize = requantize
        self.max_added_error = max_added_error
        self.ort_contrib_ops = ort_contrib_ops
        self.contrib_used = False  # a com.microsoft op was emitted: the model must import it
        self.samples: dict[fx.Node, torch.Tensor] = {}  # conv outputs, to fit requant grids
        # add → (requantized conv, residual, where the residual's codes are)
        self.residual_adds: dict[fx.Node, tuple[fx.Node, fx.Node, fx.Node]] = {}
        self.env: dict[fx.Node, Any] = {}
        self.weight_q: dict[fx.Node, tuple[np.ndarray, _QParams]] = {}
        self._weights: dict[tuple[fx.Node, bool], str] = {}  # each weight is stored once
        self.act_q: dict[str, _QParams] = {}  # DQ output name → its quantizer
        self.act_pc: dict[str, tuple[str, _QParams]] = {}  # per-axis-1 DQ → (float input, Q)
        self.report: dict[str, Any] = {"requantized": [], "float_convs": [], "channel_folded": []}

    # ---- helpers
    def fq(self, n: fx.Node) -> FakeQuantizer:
        return self.gm.get_submodule(n.target)

    def shape(self, n: fx.Node) -> tuple:
        s = self.shapes.get(n)
        if not isinstance(s, tuple):
            raise ExportError(f"{_where(n)}: expected a tensor, found {type(s).__name__}")
        return s

    def rank(self, n: Any) -> int:
        return len(self.shape(n))

    def v(self, a: Any) -> str:
        """The ONNX value of an argument (a node, or a Python number as a constant)."""
        if isinstance(a, fx.Node):
            if a in self.weight_q:
                return self.weight(a)
            if a not in self.env:
                self.env[a] = self.materialize(a)
            out = self.env[a]
            if out is None or isinstance(out, list):
                raise ExportError(f"{_where(a)} is not a single tensor in the ONNX graph")
            return out
        if isinstance(a, bool):
            return self.b.const(a, np.bool_)
        if isinstance(a, (int, float)):
            return self.b.const(a)
        raise ExportError(f"cannot use {a!r} ({type(a).__name__}) as a tensor input")

    def target_shape(self, n: fx.Node, args_shape: Any = None) -> str:
        """Shape input of a Reshape: static dims, and ``-1`` for the one dynamic dim."""
        shape = self.shape(n)
        if sum(d is None for d in shape) <= 1:
            return self.b.ints([-1 if d is None else d for d in shape])
        if args_shape is None:
            raise ExportError(f"{_where(n)}: more than one batch-dependent dim in {shape}")
        return self.sym_shape(args_shape)

    def sym_shape(self, items: Sequence[Any]) -> str:
        parts = [self.sym(x) if isinstance(x, fx.Node) else self.b.ints([x]) for x in items]
        return self.b.op("Concat", parts, "shape", axis=0)

    def sym(self, n: fx.Node) -> str:
        """A symbolic int (sym_size and Python arithmetic on it) as an int64 [1] tensor."""
        if n in self.env and isinstance(self.env[n], str):
            return self.env[n]
        if n.target is aten.sym_size.int:
            shape = self.b.op("Shape", [self.v(n.args[0])], "shape")
            out = self.b.op("Gather", [shape, self.b.ints([n.args[1]])], n.name, axis=0)
        elif n.target in (operator.mul, operator.add, operator.sub, operator.floordiv):
            ops = {
                operator.mul: "Mul",
                operator.add: "Add",
                operator.sub: "Sub",
                operator.floordiv: "Div",
            }
            a, c = (self.sym(x) if isinstance(x, fx.Node) else self.b.ints([x]) for x in n.args)
            out = self.b.op(ops[n.target], [a, c], n.name)
        else:
            raise ExportError(f"{_where(n)}: unsupported symbolic-int op {n.target}")
        self.env[n] = out
        return out

    # ---- quantizers
    def quantize_activation(self, n: fx.Node, x: str) -> str:
        fq = self.fq(n)
        if fq.mode == "off":
            return x
        if fq.mode != "quantize" or not fq.calibrated:
            raise ExportError(
                f"{_where(n)}: quantizer {n.target} is in mode {fq.mode!r} "
                f"(calibrated={fq.calibrated}); calibrate it (the 'calibrate' pass) before export"
            )
        qp = _qparams(fq, _where(n), as_weight=False)
        rank = self.rank(n.args[0])
        axis = None if qp.axis is None else qp.axis % rank
        return self.qdq(x, qp, n.name, axis, rank)

    def codes(self, x: str, qp: _QParams, base: str, axis: int | None = None, rank: int = 4):
        """``Clip(QuantizeLinear(x, s, z[, axis]))``: the integer codes of ``x``.

        A per-channel quantization is written as ``QuantizeLinear(x·(s̄/s_c) + (z_c − z̄)·s̄,
        s̄, z̄)``, the same codes (``round(x/s_c + z_c − z̄) + z̄``, ``z_c − z̄`` an integer)
        with a per-tensor Q, for two reasons found in ONNX Runtime 1.32. A per-axis Q right
        after an op that it fuses with its output Q (a quantized Conv / MatMul / Add...)
        became, say, a QLinearConv with a per-channel output zero point, accepted when the
        graph was optimised and rejected when it ran. And where its NHWC layout transformer
        moves a per-axis Q to ``axis=3``, that Q took 125 ms of a 325 ms batch-32
        mobilevit_xxs run (the same Q at ``axis=1``: 1 ms).
        """
        dtype = qp.zero_point.dtype
        if axis is not None:
            shape = [-1] + [1] * (rank - 1 - axis)
            sigma = qp.scale.astype(np.float64)
            z = qp.zero_point.astype(np.int64)
            s_bar, z_bar = _shared_scale_and_zero(sigma, z)
            ratio = (s_bar / sigma).astype(np.float32).reshape(shape)
            shift = ((z - z_bar) * s_bar).astype(np.float32).reshape(shape)
            if np.any(ratio != 1):
                x = self.b.op("Mul", [x, self.b.init(ratio, f"{base}_ratio")], f"{base}_rescale")
            if np.any(shift != 0):
                x = self.b.op("Add", [x, self.b.init(shift, f"{base}_shift")], f"{base}_shift")
            s, z_ = self.b.const(np.float32(s_bar)), self.b.const(z_bar, dtype)
            q = self.b.op("QuantizeLinear", [x, s, z_], f"{base}_q")
        else:
            s, z_ = self.b.const(qp.scale), self.b.const(qp.zero_point, dtype)
            q = self.b.op("QuantizeLinear", [x, s, z_], f"{base}_q")
        if qp.needs_clip:
            lo, hi = self.b.const(qp.qmin, dtype), self.b.const(qp.qmax, dtype)
            q = self.b.op("Clip", [q, lo, hi], f"{base}_clip")
        return q

    def qdq(self, x: str, qp: _QParams, base: str, axis: int | None = None, rank: int = 4) -> str:
        s = self.b.const(qp.scale)
        z = self.b.const(qp.zero_point, qp.zero_point.dtype)
        kw = {} if axis is None else {"axis": axis}
        q = self.codes(x, qp, base, axis, rank)
        out = self.b.op("DequantizeLinear", [q, s, z], f"{base}_dq", **kw)
        if axis is None:
            self.act_q[out] = qp
        elif axis == 1:
            self.act_pc[out] = (x, qp)
        return out

    def weight(self, n: fx.Node, *, transpose: bool = False) -> str:
        """A weight input: ``DQ(int8 initializer)`` if quantized, else a float initializer."""
        if (n, transpose) in self._weights:
            return self._weights[(n, transpose)]
        if n in self.weight_q:
            q, qp = self.weight_q[n]
            axis = qp.axis
            if transpose:
                if q.ndim != 2:
                    raise ExportError(f"{_where(n)}: linear weight of rank {q.ndim}")
                q = q.T
                axis = None if axis is None else 1 - axis % 2
            out = self.weight_dq(n, q, qp.scale, qp.zero_point, axis)
        else:
            out = self.v(n)
            if transpose:
                out = self.b.op("Transpose", [out], f"{n.name}_t", perm=[1, 0])
        self._weights[(n, transpose)] = out
        return out

    def weight_dq(
        self, n: fx.Node, q: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int | None
    ) -> str:
        """``DequantizeLinear`` of the int8 initializer ``q`` of weight quantizer node ``n``."""
        src = n.args[0].name
        inputs = [
            self.b.init(q, f"{src}_q"),
            self.b.init(scale, f"{src}_scale"),
            self.b.init(zero, f"{src}_zp"),
        ]
        kw = {} if axis is None else {"axis": axis}
        return self.b.op("DequantizeLinear", inputs, f"{n.name}_dq", **kw)

    def requant_params(self, conv: fx.Node) -> tuple[_QParams, str] | None:
        """``(s_y, z_y)`` for a conv output that reaches a per-tensor quantizer, or None.

        The path conv → [activation] → [data movement]* → quantizer must be the only use of
        each tensor on it ("exact"); ``"auto"`` also accepts side uses (a residual branch then
        sees the requantized value) and smooth activations (a derived grid).
        """
        path = self._requant_path(conv)
        if path is None:
            return None
        strict = self.requantize == "exact"
        act, target = path
        fq = self.fq(target)
        if fq.mode != "quantize" or fq.spec.bits > 8:
            return None
        qp = _qparams(fq, _where(target), as_weight=False)
        if qp.dtype != TensorProto.UINT8:
            return None
        if act is _RESIDUAL:
            add = next(iter(conv.users))
            residual = self._residual(add, conv)
            y, r = self.samples.get(conv), self.samples.get(residual)
            if qp.axis is not None or residual is None or y is None or r is None:
                return None
            source = self._residual_codes(residual)
            if source is None:
                return None
            grid, added = _residual_grid(qp, y, r)
            if added > self.max_added_error:
                return None
            self.residual_adds[add] = (conv, residual, source)
            why = f"uint8 grid + residual {residual.name} for {target.target}: +{added:.0%} error"
            return grid, why
        if qp.axis is not None:  # per-channel target: one uint8 grid can only approximate it
            y = self.samples.get(conv)
            if strict or y is None or y.dim() != 4 or qp.axis % 4 != 1:
                return None
            f = _SMOOTH_ACTS.get(act, torch.relu if act in _EXACT_ACTS else (lambda v: v))
            grid, added = _requant_range_per_channel(f, qp, y)
            if added > self.max_added_error:
                return None
            return grid, f"uint8 grid for per-channel {target.target}: +{added:.0%} error"
        if act is None or act in _EXACT_ACTS:
            why = f"grid of {target.target}" + (f" through {act.__name__}" if act else "")
            return _QParams(qp.dtype, qp.scale, qp.zero_point, 0, 255, None), why
        if strict:
            return None
        y_lo, y_hi = _requant_range(_SMOOTH_ACTS[act], qp, self.samples.get(conv))
        why = f"{act.__name__} range [{y_lo:.3g}, {y_hi:.3g}] for {target.target}"
        return _uint8_grid(y_lo, y_hi), why

    def _requant_path(self, conv: fx.Node) -> tuple[Any, fx.Node] | None:
        """``(activation or None, quantizer node)`` that the conv output reaches, or None."""
        if self.requantize == "none":
            return None
        users = list(conv.users)
        act = None
        if (
            len(users) == 1
            and users[0].op == "call_function"
            and (users[0].target in _SMOOTH_ACTS or users[0].target in _EXACT_ACTS)
        ):
            act, users = users[0].target, list(users[0].users)
        elif self.requantize == "auto" and len(users) == 1 and self._residual(users[0], conv):
            act, users = _RESIDUAL, list(users[0].users)
        target = self._find_quantizer(users, self.requantize == "exact")
        return None if target is None else (act, target)

    def _residual(self, add: fx.Node, conv: fx.Node) -> fx.Node | None:
        """The other input of ``add`` if it is ``conv + r`` (or ``r + conv``) of one shape."""
        if add.target is not aten.add.Tensor or add.kwargs.get("alpha", 1) != 1:
            return None
        a, c = add.args[:2]
        other = c if a is conv else a if c is conv else None
        if not isinstance(other, fx.Node) or other is conv:
            return None
        return other if self.shapes.get(other) == self.shapes.get(conv) else None

    def _residual_codes(self, r: fx.Node) -> fx.Node | None:
        """Where the residual ``r`` is (or can be read as) per-tensor uint8 codes: ``r`` itself
        when its ONNX value is a requantized conv output or a DequantizeLinear, or a per-tensor
        quantizer that ``r`` also feeds (the residual then sees that quantizer's value, as a
        side use of a requantized conv does)."""
        if r in self.env and self.env[r] in self.act_q:
            return r
        return next((u for u in r.users if self.uint8_grid(u) is not None), None)

    def uint8_grid(self, n: fx.Node) -> _QParams | None:
        """The qparams of ``n`` if it is a calibrated per-tensor uint8 activation quantizer."""
        if not _is_fq(self.gm, n):
            return None
        fq = self.fq(n)
        if fq.mode != "quantize" or not fq.calibrated or fq.spec.bits > 8:
            return None
        qp = _qparams(fq, _where(n), as_weight=False)
        return qp if qp.axis is None and qp.dtype == TensorProto.UINT8 else None

    def residual_value(self, add: fx.Node) -> str:
        """The residual input of a requantized ``conv + r``: per-tensor uint8 codes, read."""
        _, r, source = self.residual_adds[add]
        if source is r:
            return self.v(r)
        if source not in self.env:  # the quantizer is emitted here, before its turn
            self.env[source] = self.quantize_activation(source, self.v(source.args[0]))
        return self.env[source]

    def sample_nodes(self, conv: fx.Node) -> set[fx.Node]:
        """The values a conv's requantization grid is fitted on (calibration outputs): its
        output, and a residual added to it; none if its grid is not fitted."""
        path = self._requant_path(conv)
        if path is None:
            return set()
        act, target = path
        if act is _RESIDUAL:
            return {conv, self._residual(next(iter(conv.users)), conv)}
        return {conv} if act in _SMOOTH_ACTS or self.fq(target).spec.per_channel else set()

    def _find_quantizer(self, users: list[fx.Node], strict: bool) -> fx.Node | None:
        for _ in range(16):
            if strict and len(users) != 1:
                return None
            fqs = [u for u in users if _is_fq(self.gm, u)]
            if fqs:
                return fqs[0]
            moves = [u for u in users if u.op == "call_function" and u.target in _MOVES]
            if len(moves) != 1:
                return None
            users = list(moves[0].users)
        return None

    # ---- main loop
    def run(self) -> list[str]:
        outputs: list[str] = []
        for n in self.gm.graph.nodes:
            if n.op == "placeholder" or (n in self.env and n.op != "output"):
                continue  # the input (set by the caller), or emitted with an earlier node
            if n.op == "output":
                outs = n.args[0] if isinstance(n.args[0], (tuple, list)) else [n.args[0]]
                outputs = [self.v(o) for o in outs]
                continue
            if n.op == "get_attr" or n in self.consts:
                continue  # emitted where used (weights under a quantizer are stored as int8)
            if _is_fq(self.gm, n):
                src = n.args[0]
                if src.op == "get_attr" or src in self.consts:
                    self.weight_fq(n, src)
                else:
                    self.env[n] = self.quantize_activation(n, self.v(src))
                continue
            if n.op != "call_function":
                raise ExportError(f"{_where(n)}: cannot export {n.op} {n.target!r}")
            handler = _HANDLERS.get(n.target)
            if handler is None:
                if n.target in _SYM_OPS:
                    continue  # translated lazily, where a shape needs it
                raise ExportError(
                    f"{_where(n)}: no ONNX translation for {n.target}; supported ops are "
                    f"listed in hyq_fx.backends.onnx_qdq._HANDLERS (add one there)"
                )
            out = handler(self, n, *n.args, **n.kwargs)
            if n not in self.env:
                self.env[n] = out
        return outputs

    def materialize(self, n: fx.Node) -> Any:
        """A parameter, or a subgraph that does not depend on the input, as initializers."""
        if n.op == "get_attr":
            return self.b.init(getattr_path(self.gm, n.target).detach().numpy(), n.target)
        if n not in self.consts:
            raise ExportError(f"{_where(n)} has no ONNX value (it is used before defined)")
        value = self.consts[n]
        if isinstance(value, torch.Tensor):
            array = value.detach().cpu().numpy()
            small = _broadcast_source(array)
            if small is None:
                return self.b.init(array, f"{n.name}_const")
            source = self.b.init(small, f"{n.name}_const")
            return self.b.op("Expand", [source, self.b.ints(array.shape)], f"{n.name}_expand")
        if isinstance(value, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in value):
            return [
                self.b.init(t.detach().cpu().numpy(), f"{n.name}_{i}") for i, t in enumerate(value)
            ]
        return None

    def weight_fq(self, n: fx.Node, src: fx.Node) -> None:
        fq = self.fq(n)
        w = self.consts.get(src)
        if w is None:
            w = getattr_path(self.gm, src.target)
        if fq.mode == "off":
            self.env[n] = self.b.init(w.detach().numpy(), src.name)
            return
        if fq.mode != "quantize" or not fq.calibrated:
            raise ExportError(f"{_where(n)}: weight quantizer {n.target} is not calibrated")
        qp = _qparams(fq, _where(n), as_weight=True)
        self.weight_q[n] = (_quantize_weight(w, fq, qp), qp)
        self.env[n] = None  # emitted by the consumer, which picks the layout (see weight())


def _int8_weights(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` computes with quantized weights (a weight quantizer that is on)."""
    return any(
        isinstance(m, FakeQuantizer) and m.role == "weight" and m.mode == "quantize"
        for m in gm.modules()
    )


def _broadcast_source(array: np.ndarray, min_size: int = 1024) -> np.ndarray | None:
    """The smallest array that broadcasts to ``array`` (size 1 along every axis it is constant
    on), if ``array`` is large and that saves space: such constants (a per-channel norm affine
    expanded over a token grid) are stored small and expanded when the model loads."""
    if array.size < min_size or array.ndim == 0:
        return None
    small = array
    for axis in range(array.ndim):
        first = np.take(small, [0], axis=axis)
        if small.shape[axis] > 1 and np.array_equal(small, np.broadcast_to(first, small.shape)):
            small = first
    return small if small.size < array.size else None
