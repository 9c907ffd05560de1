"""ONNX QDQ backend: write a hyq-fx fake-quant GraphModule as a QDQ ONNX model, and run it.

Every calibrated :class:`~hyq_fx.quantizer.FakeQuantizer` becomes standard ONNX
``QuantizeLinear`` / ``DequantizeLinear`` operators (the "QDQ format" of ONNX Runtime), its
weights int8 / uint8 initializers behind DequantizeLinear; with ``requantize="none"`` (default)
the file computes the fake-quant graph that hyq-fx evaluated, up to one-step flips where float
sums differ in the last bit, and ``"auto"`` / ``"exact"`` requantize conv outputs so that ONNX
Runtime runs integer kernels (QLinearConv, QLinearAdd, QLinearConcat, MatMulIntegerToFloat).

``export_onnx_qdq`` (here, with ``export_artifact`` for a saved artifact) lowers the module
(:mod:`hyq_fx.lowering`, and :mod:`hyq_fx.token_layout` for int8 weights), runs it to record
shapes and constants, translates it op by op, applies the ONNX Runtime post-passes and writes
the file (:mod:`~hyq_fx.backends.onnx_file`). Each step is a module stating its contract and
equations:

* :mod:`~hyq_fx.backends.onnx_qparams`: a quantizer in ONNX terms (``x̂ = DQ(Clip(Q(x, s, z)))``,
  ``W_q = clamp(round(W/s) + z, qmin, qmax)``), uint8 containers for symmetric activations;
* :mod:`~hyq_fx.backends.onnx_requantize`: which conv outputs are requantized,
  ``y → DQ(Q(y, s_y, z_y))``, and the uint8 grids fitted on calibration images;
* :mod:`~hyq_fx.backends.onnx_record`: shapes at two batch sizes (dynamic batch) and the
  subgraphs stored as constants;
* :mod:`~hyq_fx.backends.onnx_translate`: the translator, node by node, with the op table
  :mod:`~hyq_fx.backends.onnx_ops` and its handlers (:mod:`~hyq_fx.backends.onnx_ops_conv`,
  including the folding of per-channel input scales into a conv,
  :mod:`~hyq_fx.backends.onnx_ops_math`, :mod:`~hyq_fx.backends.onnx_ops_shape`);
* :mod:`~hyq_fx.backends.onnx_builder`: the ONNX graph under construction;
  :mod:`~hyq_fx.backends.onnx_ort_passes`: rewrites of the built graph for ONNX Runtime;
* :mod:`~hyq_fx.backends.onnx_runner`: ``OnnxRunner`` and ``onnx_node_counts``.

The names those modules define that this module held before it was split (``OnnxRunner``,
``_Builder``, the post-passes, ``_broadcast_source``, ...) are imported here, so
``hyq_fx.backends.onnx_qdq.NAME`` still works; the op handlers are reached through
``_HANDLERS``.

Invariants checked by ``tests/test_onnx_backend.py``: with every quantizer ``off`` the export
matches the float graph to 1e-5 (any batch size); with ``requantize="none"`` it matches the
fake-quant graph up to one-step flips where torch and ONNX Runtime round float sums that differ
in the last bits (SQNR bound); weights are int8 initializers behind per-channel
DequantizeLinear nodes, the file is ≤ 0.35x the FP32 one, and ONNX Runtime runs QLinearConv /
MatMulIntegerToFloat kernels; a conv behind a per-channel input quantizer (depthwise, or a 1x1
conv after outlier scaling) runs as QLinearConv and matches the fake-quant model to float
rounding (SQNR > 80 dB), and a requantization grid before a per-channel quantizer is kept only
when its measured added error is under the bound.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import TensorProto, helper
from torch import fx

from hyq_fx.lowering import (
    fold_tokens_with_pixel_shuffle,
    lower_for_export,
    unfold_maps_with_pixel_unshuffle,
)
from hyq_fx.quantize import deployed_meta, input_shape, quantizers_mode
from hyq_fx.quantizer import FakeQuantizer
from hyq_fx.token_layout import tokens_channels_last

from .onnx_builder import MS_DOMAIN, _Builder
from .onnx_file import INPUT_NAME, OUTPUT_NAME, write_model
from .onnx_ops import _HANDLERS, _SYM_OPS, _handles  # noqa: F401 (re-exported)
from .onnx_ops_conv import (  # noqa: F401 (re-exported)
    _constant,
    _fold_channel_scales,
    _FoldedInput,
    _weight_or_value,
)
from .onnx_ops_math import _binary, _pair, _pool_window, _reduce, _unary  # noqa: F401
from .onnx_ops_shape import _BROADCASTING, _broadcast_does_it, _split_out  # noqa: F401
from .onnx_ort_passes import (  # noqa: F401 (_ONNX_MOVES, _per_tensor: re-exported)
    _ONNX_MOVES,
    _fold_scalar_mul_into_quantize,
    _matmul_bias_in_int8,
    _per_tensor,
    _quantize_before_moves,
    _silu_in_uint8,
)
from .onnx_qparams import (  # noqa: F401 (re-exported)
    ExportError,
    _QParams,
    _qparams,
    _quantize_weight,
    _shared_scale_and_zero,
)
from .onnx_record import (  # noqa: F401 (re-exported)
    _is_fq,
    _merge,
    _not_foldable,
    _Recorder,
    _shape_of,
    _where,
    getattr_path,
)
from .onnx_requantize import (  # noqa: F401 (re-exported)
    _CONVS,
    _EXACT_ACTS,
    _MOVES,
    _RESIDUAL,
    _SMOOTH_ACTS,
    FIT_IMAGES,
    MAX_ADDED_ERROR,
    _grid,
    _preimage,
    _requant_range,
    _requant_range_per_channel,
    _residual_grid,
    _uint8_grid,
)
from .onnx_runner import OnnxRunner, onnx_node_counts
from .onnx_translate import _broadcast_source, _int8_weights, _Translator  # noqa: F401

__all__ = ["ExportError", "OnnxRunner", "export_artifact", "export_onnx_qdq", "onnx_node_counts"]

MIN_OPSET, MAX_OPSET = 17, 21
REQUANTIZE = ("auto", "exact", "none")
TOKEN_LAYOUTS = ("auto", "channels_first", "channels_last")


def _example_batches(example_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = example_input.detach().float()
    one = x[:1]
    return one, one.repeat(2, *([1] * (x.dim() - 1)))


def export_onnx_qdq(
    gm: fx.GraphModule,
    path: str | os.PathLike[str],
    example_input: torch.Tensor,
    *,
    opset: int = MIN_OPSET,
    requantize: str = "none",
    calib: torch.Tensor | None = None,
    check: bool = True,
    ort_contrib_ops: bool = False,
    max_added_error: float = MAX_ADDED_ERROR,
    token_layout: str = "auto",
) -> Path:
    """Write ``gm`` (a calibrated hyq-fx GraphModule) to ``path`` as a QDQ ONNX model.

    ``example_input`` is one image batch ``[N, C, H, W]`` (N ≥ 1) of the deployed size; the
    batch dimension of the ONNX model is dynamic. ``requantize``: ``"none"`` (default) never
    requantizes, so the ONNX model computes the fake-quant graph; ``"auto"`` requantizes conv
    outputs where an int8 conv kernel (QLinearConv) can then be used (exact for identity/ReLU,
    an extra rounding with a fitted grid for SiLU/GELU/Hardswish, and for a conv added to a
    residual before a quantizer, which ONNX Runtime then runs as QLinearAdd: the grid is
    fitted so that the sum's codes change least, and kept if it adds at most
    ``max_added_error`` to that quantizer's own error); ``"exact"`` only where exact. Both
    also write, exactly, a concat before a per-tensor quantizer on codes (QLinearConcat), fold
    a positive scalar factor into the quantizer after it (attention's ``q·d^-½``) and move
    per-tensor quantizers before the data movement that leads to them (reshapes, transposes,
    DepthToSpace then run on uint8). On mobilevit_xxs at batch 32 on 2 cores these, with the
    linear bias inside MatMulIntegerToFloat (``ort_contrib_ops``), took our int8 file from
    1.05x to 1.34x ONNX Runtime FP32 (``benchmarks/results/latency_ort_pair_s12_xxs_b32``).
    ``calib``: images (calibration images; the first 16 are used) on which the SiLU/GELU grids
    are fitted; without them a grid is derived from the next quantizer's range alone.
    ``max_added_error``: with ``"auto"``, a conv whose output reaches a per-channel quantizer,
    or is added to a residual, is requantized only if its uint8 grid adds at most this
    fraction to that quantizer's own squared error on ``calib`` (without ``calib`` it is not
    requantized).
    ``check`` runs ``onnx.checker``. ``ort_contrib_ops`` writes SiLU as ONNX Runtime's
    ``com.microsoft.QuickGelu(alpha=1)`` (same values): behind a requantized conv, the
    DequantizeLinear feeding both halves of ``x·Sigmoid(x)`` is duplicated by ORT's QDQ
    handling, so its own SiLU fusion fails and Sigmoid and Mul run as two passes over the tensor
    (on mobilevit_xxs at batch 32 a quarter of the int8 model's kernel time); the file then
    needs ONNX Runtime. Where a requantized conv's SiLU output goes straight into a
    per-tensor quantizer (``requantize="auto"``), it is computed on the uint8 codes instead,
    ``QLinearSigmoid`` and ``QLinearMul`` (one more rounding, of ``σ`` to ``k/255``): on
    2000 dev images the default hyq-fx W8A8 agreed with fake-quant as often as the QuickGelu
    form (97.95 vs 97.8 % xxs, 96.85 vs 97.0 % v2) and ran about 6 % faster at batch 32.
    ``token_layout``: MobileViTv2's transformer tokens ``[B, C, P, N]`` are exported
    channels-last (``"channels_last"``, :mod:`hyq_fx.token_layout`: its 1×1 convs become
    linears, which ONNX Runtime runs as integer matrix products) or as captured
    (``"channels_first"``); ``"auto"`` picks channels-last when the weights are int8. On
    mobilevitv2_050 at batch 32 on 2 cores (``benchmarks/results/
    latency_ort_pair_s13_v2_b32_layout_3``, the steadiest of three runs) the int8 file went
    from 45.3 to 36.0 ms against 55.2 ms for FP32; FP32 itself gained nothing channels-last
    (its float 1×1 conv is as fast as MatMul; −9 % to +8 % over the three runs), so float
    exports keep the captured layout.
    Quantizers in mode ``off`` are exported as float.
    The export report (requantized convs, float convs) and ``gm.meta["hyq"]`` (recipe, bits,
    preprocessing) are stored in the model's metadata as JSON under ``hyq`` and
    ``hyq_export``.
    """
    if not isinstance(gm, fx.GraphModule):
        raise ExportError(f"export_onnx_qdq needs a torch.fx.GraphModule, got {type(gm).__name__}")
    if requantize not in REQUANTIZE:
        raise ExportError(f"requantize={requantize!r}; use one of {REQUANTIZE}")
    if token_layout not in TOKEN_LAYOUTS:
        raise ExportError(f"token_layout={token_layout!r}; use one of {TOKEN_LAYOUTS}")
    if not max_added_error >= 0:
        raise ExportError(f"max_added_error={max_added_error!r}; use a fraction >= 0 (e.g. 1.0)")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset={opset}; use {MIN_OPSET}..{MAX_OPSET} (LayerNormalization ≥ 17)")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise ExportError("example_input must be an image batch tensor [N, C, H, W]")
    gm = fold_tokens_with_pixel_shuffle(lower_for_export(gm, example_input), example_input)
    gm = unfold_maps_with_pixel_unshuffle(gm, example_input)
    layout = "channels_first"
    if token_layout == "channels_last" or (token_layout == "auto" and _int8_weights(gm)):
        lowered, gm = gm, tokens_channels_last(gm, example_input)
        layout = "channels_last" if gm is not lowered else layout
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ExportError(f"the module takes {len(placeholders)} inputs; only one is supported")

    for name, fq in gm.named_modules():
        if isinstance(fq, FakeQuantizer) and fq.mode == "observe":
            raise ExportError(
                f"quantizer {name} is still observing (not calibrated): run the 'calibrate' "
                "pass (hyq_fx.quantize does) before export"
            )
    dependent = _not_foldable(gm)
    foldable = {n for n in gm.graph.nodes if n.op == "call_function" and n not in dependent}
    was_training = gm.training
    gm.eval()
    try:  # shapes do not depend on the quantizers, and the float run is much faster
        with torch.no_grad(), quantizers_mode(gm, "off"):
            runs = []
            for x in _example_batches(example_input):
                rec = _Recorder(gm, foldable)
                rec.run(x)
                runs.append(rec)
    finally:
        gm.train(was_training)
    shapes = {n: _merge(runs[0].shapes.get(n), runs[1].shapes.get(n)) for n in runs[0].shapes}
    consts = runs[0].values

    b = _Builder(opset)
    tr = _Translator(
        gm, shapes, consts, b, requantize=requantize, ort_contrib_ops=ort_contrib_ops,
        max_added_error=max_added_error,
    )  # fmt: skip
    if requantize == "auto" and calib is not None:  # conv outputs whose grids are fitted
        fitted = set().union(*(tr.sample_nodes(n) for n in gm.graph.nodes if n.target in _CONVS))
        if fitted:
            rec = _Recorder(gm, fitted)
            with torch.no_grad():
                rec.run(calib[:FIT_IMAGES].detach().float())
            tr.samples = rec.values
    ph = placeholders[0]
    tr.env[ph] = INPUT_NAME
    b._names.add(INPUT_NAME)
    out_names = tr.run()
    tr.report["token_layout"] = layout
    if requantize != "none":
        tr.report["scalar_mul_folded"] = _fold_scalar_mul_into_quantize(b)
        tr.report["quantized_before_moves"] = _quantize_before_moves(b)
    if ort_contrib_ops:
        tr.report["silu_in_uint8"] = _silu_in_uint8(b)
        tr.report["matmul_bias_fused"] = _matmul_bias_in_int8(b)
        tr.contrib_used |= tr.report["matmul_bias_fused"] > 0
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    out_args = (
        out_node.args[0] if isinstance(out_node.args[0], (tuple, list)) else [out_node.args[0]]
    )
    outputs = []
    for i, (name, arg) in enumerate(zip(out_names, out_args, strict=True)):
        oname = OUTPUT_NAME if i == 0 else f"{OUTPUT_NAME}_{i}"
        b.nodes.append(helper.make_node("Identity", [name], [oname], name=f"{oname}_out"))
        outputs.append(_value_info(oname, shapes.get(arg)))
    b.prune([o.name for o in outputs])
    graph = helper.make_graph(
        b.nodes,
        "hyq_qdq",
        [_value_info(INPUT_NAME, shapes.get(ph))],
        outputs,
        initializer=list(b.inits.values()),
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)]
        + ([helper.make_opsetid(MS_DOMAIN, 1)] if tr.contrib_used else []),
        producer_name="hyq-fx",
    )
    model.ir_version = min(model.ir_version, 10)
    report = {
        **tr.report,
        "requantize": requantize,
        "opset": opset,
        "n_weight_quantizers": len(tr.weight_q),
        "n_activation_qdq": sum(1 for n in b.nodes if n.op_type == "QuantizeLinear"),
    }
    return write_model(model, path, gm, report, check=check)


def _value_info(name: str, shape: Any) -> onnx.ValueInfoProto:
    dims = (
        [d if d is not None else "batch" if i == 0 else f"d{i}" for i, d in enumerate(shape)]
        if isinstance(shape, tuple)
        else None
    )
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def export_artifact(
    out_dir: str | os.PathLike[str],
    onnx_path: str | os.PathLike[str] | None = None,
    *,
    calib_dir: str | os.PathLike[str] | None = None,
    n_images: int = 32,
    requantize: str = "none",
    opset: int = MIN_OPSET,
    ort_contrib_ops: bool = False,
    max_added_error: float = MAX_ADDED_ERROR,
    token_layout: str = "auto",
) -> Path:
    """Export the quantized model saved in ``out_dir`` (``hyq-fx quantize --out``) to
    ``onnx_path`` (default ``out_dir/model.qdq.onnx``) at the input size it was quantized at;
    ``calib_dir``: an ImageFolder whose first ``n_images`` images fit the requantization grids
    (recommended with ``"auto"``; default: the images ``hyq-fx quantize`` kept in ``out_dir``)."""
    from hyq_fx.artifact import load, load_fit_images
    from hyq_fx.data import image_folder

    gm = load(out_dir)
    info = deployed_meta(gm).get("model_info", {})
    size = input_shape(gm) or (3, 224, 224)
    calib = load_fit_images(out_dir)
    if calib_dir is not None:
        ds = image_folder(calib_dir, info, limit=n_images)
        calib = torch.stack([ds[i][0] for i in range(len(ds))])
    example = calib[:1] if calib is not None else torch.zeros(1, *size)
    path = Path(onnx_path) if onnx_path is not None else Path(out_dir) / "model.qdq.onnx"
    return export_onnx_qdq(
        gm, path, example, opset=opset, requantize=requantize, calib=calib,
        ort_contrib_ops=ort_contrib_ops, max_added_error=max_added_error,
        token_layout=token_layout,
    )  # fmt: skip
