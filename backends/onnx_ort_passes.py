"""ONNX Runtime post-passes on the built QDQ graph: rewrites that ONNX Runtime 1.32 does not make.

Each pass takes the ``_Builder`` after translation, rewrites its nodes in place and returns the
number of sites rewritten (the export report stores it). ``export_onnx_qdq`` runs the first two
when it requantizes (``requantize`` ``"auto"`` / ``"exact"``), the last two with
``ort_contrib_ops=True``:

* ``_fold_scalar_mul_into_quantize``: ``QuantizeLinear(x · c; s, z) → QuantizeLinear(x; s/c, z)``
  for a constant scalar ``c > 0`` (the same codes, up to the float rounding of a tie);
* ``_quantize_before_moves``: ``x → [Reshape | Transpose | DepthToSpace | …]* → Q(s, z)`` becomes
  ``x → Q(s, z) → [the same ops]`` (exact: a per-tensor quantizer commutes with data movement);
  the moves then run on uint8 codes;
* ``_silu_in_uint8``: ``DQ(s₁, z₁) → QuickGelu → Q(s₂, z₂)`` on uint8 codes becomes
  ``QLinearMul(q, QLinearSigmoid(q; 1/255, 0); s₂, z₂)`` (one more rounding, of ``σ`` to
  ``k/255``: at most ``|x|/510``);
* ``_matmul_bias_in_int8``: ``Add(MatMul(DQ(a), DQ(w)), bias)`` becomes
  ``com.microsoft.MatMulIntegerToFloat(a, w, s_a, s_w, z_a, z_w, bias)`` (the same integer
  product, the bias added in the kernel's epilogue).

Each function's docstring gives the conditions and the measured effect. ``_per_tensor`` tells a
per-tensor Q / DQ node (no ``axis``, scalar initializer scale and zero point).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_builder import MS_DOMAIN, _Builder

_ONNX_MOVES = {"Reshape", "Transpose", "DepthToSpace", "SpaceToDepth", "Squeeze", "Unsqueeze"}


def _per_tensor(b: _Builder, node: onnx.NodeProto) -> bool:
    """Whether a Q/DQ node is per-tensor: no ``axis``, its scale (and zero point, if given)
    scalar initializers."""
    return not any(a.name == "axis" for a in node.attribute) and all(
        b.inits.get(i) is not None and not b.inits[i].dims for i in node.input[1:3]
    )


def _fold_scalar_mul_into_quantize(b: _Builder) -> int:
    """``QuantizeLinear(x · c; s, z)`` with a constant scalar ``c > 0`` (the only use of the
    product) becomes ``QuantizeLinear(x; s / c, z)``: the same codes (up to the float rounding
    of a tie), one pass less, and the quantizer can then move before the data movement that
    made ``x`` (attention's ``q · d^-½`` after the head split). Returns the number folded."""
    producer, users = b.links()
    n_users = {name: len(nodes) for name, nodes in users.items()}

    def scalar(name: str) -> float | None:
        t = b.inits.get(name)
        if t is None or t.data_type != TensorProto.FLOAT or np.prod(t.dims, dtype=np.int64) != 1:
            return None
        return float(numpy_helper.to_array(t).reshape(()))

    dropped: set[int] = set()
    for q in b.nodes:
        if q.op_type != "QuantizeLinear" or len(q.input) < 2 or not _per_tensor(b, q):
            continue
        mul = producer.get(q.input[0])
        if mul is None or mul.op_type != "Mul" or n_users.get(q.input[0]) != 1:
            continue
        s_q = scalar(q.input[1])
        for k in (0, 1):
            c = scalar(mul.input[1 - k])
            if c is not None and c > 0 and s_q is not None:
                q.input[0] = mul.input[k]
                q.input[1] = b.init(np.float32(s_q / c), f"{q.name}_scale")
                dropped.add(id(mul))
                break
    b.nodes = [n for n in b.nodes if id(n) not in dropped]
    return len(dropped)


def _quantize_before_moves(b: _Builder) -> int:
    """``x → [Reshape | Transpose | DepthToSpace | …]* → QuantizeLinear(s, z)`` (per-tensor,
    each op the only user of its input) becomes ``x → QuantizeLinear(s, z) → [the same ops]``:
    exact, since a per-tensor quantizer commutes with data movement, and the moves then run on
    uint8 codes (a quarter of the bytes). ONNX Runtime 1.32 does not move the Q itself; on
    mobilevit_xxs at batch 32 the token folds (``permute``, ``DepthToSpace``) before each
    ``conv_fusion`` input and the attention's head split of ``q`` took 2.7 ms of a 45 ms run in
    float, about a quarter of that on codes. Not every move is cheaper on uint8: ORT's uint8
    Transpose of MobileViT's *unfold* (``[16384, 8, 2, 2]``, inner dimension 2) took 11.8 ms
    against 0.2 ms in float; the unfold feeds LayerNorm, which has no quantizer, so no Q moves
    before it here. Returns the number of quantizers moved."""
    producer, users = b.links()
    n_users = {name: len(nodes) for name, nodes in users.items()}
    moved: dict[int, onnx.NodeProto] = {}  # first move of a chain → the Q to put before it
    dropped: set[int] = set()
    for q in b.nodes:
        if q.op_type != "QuantizeLinear" or len(q.input) < 3 or not _per_tensor(b, q):
            continue
        chain, value = [], q.input[0]
        while (
            (p := producer.get(value)) is not None
            and p.op_type in _ONNX_MOVES
            and p.domain == ""
            and n_users.get(value) == 1
            and len(p.output) == 1
        ):
            chain.append(p)
            value = p.input[0]
        if not chain:
            continue
        codes = b.fresh(f"{q.name}_early")
        moved[id(chain[-1])] = helper.make_node(
            "QuantizeLinear", [value, *q.input[1:3]], [codes], name=b.fresh(q.name)
        )
        chain[-1].input[0] = codes
        chain[0].output[0] = q.output[0]
        dropped.add(id(q))
    b.nodes = [
        new
        for node in b.nodes
        if id(node) not in dropped
        for new in ([moved[id(node)], node] if id(node) in moved else [node])
    ]
    return len(moved)


def _matmul_bias_in_int8(b: _Builder) -> int:
    """``Add(MatMul(DQ(a), DQ(w)), bias)`` (``a`` per-tensor codes, ``w`` int8 weights per
    tensor or per output column, ``bias`` a constant vector, the Add the product's only user)
    becomes ``com.microsoft.MatMulIntegerToFloat(a, w, s_a, s_w, z_a, z_w, bias)``: the same
    integer product, with the bias added in the kernel's epilogue. ONNX Runtime 1.32 makes
    that kernel from ``DQ → MatMul`` itself but leaves the Add as a separate pass over the
    float output (37 of them on mobilevit_xxs: the transformer's linears); fused, the batch-32
    int8 run took 37.7 instead of 39.9 ms. Returns the number fused."""
    producer, users = b.links()
    replaced: dict[int, onnx.NodeProto] = {}
    dropped: set[int] = set()
    for mm in b.nodes:
        if mm.op_type != "MatMul" or mm.domain:
            continue
        dq_a, dq_w = (producer.get(i) for i in mm.input)
        after = users.get(mm.output[0], [])
        if not (dq_a and dq_w and len(after) == 1 and after[0].op_type == "Add"):
            continue
        if dq_a.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
            continue
        (add,) = after
        bias = add.input[1] if add.input[0] == mm.output[0] else add.input[0]
        w = b.inits.get(dq_w.input[0])
        if w is None or w.data_type != TensorProto.INT8 or len(w.dims) != 2:
            continue
        if bias not in b.inits or list(b.inits[bias].dims) != [w.dims[1]]:
            continue
        axis = [a.i for a in dq_w.attribute if a.name == "axis"]
        if not _per_tensor(b, dq_a) or not (axis in ([1], [-1]) or _per_tensor(b, dq_w)):
            continue
        zeros = [dq.input[2] if len(dq.input) > 2 else "" for dq in (dq_a, dq_w)]
        replaced[id(add)] = helper.make_node(
            "MatMulIntegerToFloat",
            [dq_a.input[0], dq_w.input[0], dq_a.input[1], dq_w.input[1], *zeros, bias],
            [add.output[0]], name=b.fresh(f"{mm.name}_bias"), domain=MS_DOMAIN,
        )  # fmt: skip
        dropped.add(id(mm))
    b.nodes = [replaced.get(id(n), n) for n in b.nodes if id(n) not in dropped]
    return len(replaced)


def _silu_in_uint8(b: _Builder) -> int:
    """``DQ(s₁, z₁) → QuickGelu → Q(s₂, z₂)`` on uint8 codes becomes
    ``QLinearMul(q, QLinearSigmoid(q; 1/255, 0); s₂, z₂)`` (com.microsoft, uint8 in and out):
    ``y = Q₂(x · Q_σ(σ(x)))`` with ``x = s₁(q − z₁)`` and ``σ`` on the grid ``k/255``, an extra
    rounding of at most ``|x|/510``. ONNX Runtime 1.32 ran the float form 2–3x slower than
    the same QuickGelu in the FP32 model (mobilevitv2_050, batch 32: 36.9 vs 12.4 ms for 25);
    the uint8 pair took 8.8 + 8.1 ms and removes a DequantizeLinear and a QuantizeLinear each.
    Returns the number rewritten."""
    producer, users = b.links()

    def scalar_qparams(node: onnx.NodeProto) -> bool:
        return (
            len(node.input) >= 3 and _per_tensor(b, node)
            and b.inits[node.input[2]].data_type == TensorProto.UINT8
        )  # fmt: skip

    replaced: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    for gelu in b.nodes:
        if gelu.op_type != "QuickGelu":
            continue
        dq = producer.get(gelu.input[0])
        after = users.get(gelu.output[0], [])
        if dq is None or dq.op_type != "DequantizeLinear" or len(after) != 1:
            continue
        (q,) = after
        if q.op_type != "QuantizeLinear" or not (scalar_qparams(dq) and scalar_qparams(q)):
            continue
        s_sig, z_sig = b.const(1.0 / 255.0), b.const(0, np.uint8)
        sig = b.fresh(f"{gelu.name}_sigmoid")
        replaced[id(gelu)] = [
            helper.make_node(
                "QLinearSigmoid", [*dq.input[:3], s_sig, z_sig], [sig],
                name=b.fresh(f"{gelu.name}_QLinearSigmoid"), domain=MS_DOMAIN,
            ),
            helper.make_node(
                "QLinearMul", [*dq.input[:3], sig, s_sig, z_sig, *q.input[1:3]], [q.output[0]],
                name=b.fresh(f"{gelu.name}_QLinearMul"), domain=MS_DOMAIN,
            ),
        ]  # fmt: skip
        dropped.add(id(q))
    b.nodes = [
        new for node in b.nodes if id(node) not in dropped for new in replaced.get(id(node), [node])
    ]
    return len(replaced)
