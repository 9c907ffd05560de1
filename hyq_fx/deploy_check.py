"""Does a model go end to end? Quantize, export to ONNX and TVM, and compare each runtime.

One architecture is taken through every step a user takes, each timed and each allowed to
fail on its own (a failed step records its error and the later steps that need it are
skipped):

1. ``quantize`` (capture + recipe), compared with the float model: logit SQNR (dB);
2. ``onnx``: :func:`hyq_fx.backends.onnx_export.export_onnx`, run in ONNX Runtime;
3. ``torch_integer``: the integer graph (:mod:`hyq_fx.integer_graph`) run by torch: the floor
   a runtime can reach, since torch's reference ``quantize_per_tensor`` multiplies by ``1/s``
   where the fake-quant divides, which moves only codes within float rounding of a tie;
4. ``onnx_fp32``: the same export with every quantizer off, against the captured float graph:
   it checks the translation of the ops alone (float rounding, no quantization);
5. ``openvino``: the ``onnx`` file run by OpenVINO's CPU runtime in float32 precision (where
   the ``openvino`` package is installed; it is no dependency of hyq-fx);
6. ``tvm``: :func:`hyq_fx.backends.tvm_relax.build_tvm` for ``llvm`` (dynamic batch), run by
   the Relax VM.

A runtime is compared with the fake-quant model at batch 1 (the first ``BATCH1_IMAGES``
images, one at a time) and at batch ``len(images)``: logit SQNR in dB and how many top-1
predictions agree. A runtime *passes* where both SQNRs are at least ``MIN_SQNR_DB`` and top-1
agrees on at least 3 of every 4 images. A quantized graph amplifies float rounding where the
network is sensitive: a one-ulp difference that moves a value across a rounding boundary
changes its code by one step, and in a randomly initialised network whose quantization error
is already large (low SQNR against FP32) such flips grow as the quantization error does;
``onnx_fp32`` separates that from a wrong translation.

:func:`settle_batchnorm` gives a randomly initialised timm model realistic activations
(BatchNorm statistics of real images), as no pretrained weights of most architectures can be
had offline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from hyq_fx.integer_graph import integer_graph

__all__ = ["BATCH1_IMAGES", "MIN_SQNR_DB", "check_deploy", "compare", "settle_batchnorm"]

MIN_SQNR_DB = 20.0
BATCH1_IMAGES = 4
MIN_AGREEMENT = 0.75


@torch.no_grad()
def settle_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Set every BatchNorm's running statistics to their average over ``batches`` (in place;
    the model is the caller's own, freshly built) and return the model in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the settling batches
    model.train()
    for x in batches:
        model(x)
    return model.eval()


def _sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    noise = (ref.double() - got.double()).pow(2).mean().clamp_min(1e-30)
    return round(float(10 * torch.log10(ref.double().pow(2).mean() / noise)), 2)


def compare(
    reference: Callable[[torch.Tensor], torch.Tensor],
    runtime: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
) -> dict[str, Any]:
    """SQNR and top-1 agreement of ``runtime`` against ``reference`` at batch 1 and batch N."""
    with torch.no_grad():
        ref = reference(images)
        single = torch.cat([runtime(images[i : i + 1]) for i in range(BATCH1_IMAGES)])
        batched = runtime(images)
    ref1 = ref[:BATCH1_IMAGES]
    row = {
        "sqnr_b1_db": _sqnr_db(ref1, single),
        "sqnr_bn_db": _sqnr_db(ref, batched),
        "agree_b1": int((ref1.argmax(1) == single.argmax(1)).sum()),
        "agree_bn": int((ref.argmax(1) == batched.argmax(1)).sum()),
        "n_b1": len(ref1),
        "n_bn": len(ref),
    }
    row["passed"] = bool(
        min(row["sqnr_b1_db"], row["sqnr_bn_db"]) >= MIN_SQNR_DB
        and row["agree_b1"] >= MIN_AGREEMENT * row["n_b1"]
        and row["agree_bn"] >= MIN_AGREEMENT * row["n_bn"]
    )
    return row


def _error(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}"


def _timed(row: dict[str, Any], step: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    try:
        return fn()
    except Exception as exc:  # one architecture's failure is a result, not a crash
        row[step] = {"error": _error(exc)}
        return None
    finally:
        row.setdefault(step, {})["seconds"] = round(time.perf_counter() - start, 1)


def _onnx_runtime(qgm: fx.GraphModule, work: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    from hyq_fx.backends.onnx_export import export_onnx
    from hyq_fx.backends.onnx_qdq import OnnxRunner

    return OnnxRunner(export_onnx(qgm, work / "model.qdq.onnx"))


def _openvino_runtime(qgm: fx.GraphModule, work: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    import openvino

    path = work / "model.qdq.onnx"
    if not path.is_file():
        from hyq_fx.backends.onnx_export import export_onnx

        export_onnx(qgm, path)
    # f32: on CPUs with bf16 OpenVINO otherwise runs float ops in bf16 by default
    compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return lambda x: torch.from_numpy(compiled(x.detach().float().numpy())[0].copy())


def _onnx_fp32(qgm: fx.GraphModule, work: Path, images: torch.Tensor) -> dict[str, Any]:
    from hyq_fx.backends.onnx_export import export_onnx
    from hyq_fx.backends.onnx_qdq import OnnxRunner
    from hyq_fx.quantize import quantizers_mode

    with quantizers_mode(qgm, "off"), torch.no_grad():
        path = export_onnx(qgm, work / "model.fp32.onnx")
        ref = qgm(images)
    got = OnnxRunner(path)(images)
    return {"sqnr_db": _sqnr_db(ref, got), "max_abs": float((ref - got).abs().max())}


def _tvm_runtime(qgm: fx.GraphModule, work: Path, example: torch.Tensor, target: Any):
    from hyq_fx.backends.tvm_relax import TvmRunner, build_tvm

    return TvmRunner(build_tvm(qgm, example, target, work / "model.llvm.so"))


def check_deploy(
    model: nn.Module,
    calib: list[torch.Tensor],
    images: torch.Tensor,
    work_dir: str | Path,
    *,
    recipe: str = "minmax",
    backends: tuple[str, ...] = ("onnx", "torch_integer", "onnx_fp32", "openvino", "tvm"),
    tvm_target: Any = "llvm",
) -> dict[str, Any]:
    """Take ``model`` through quantize → each of ``backends``; a row of results per step.

    ``calib``: calibration batches; ``images``: at least ``BATCH1_IMAGES`` other images, the
    batch-N comparison runs all of them at once. Artifacts are written under ``work_dir``.
    ``tvm_target``: what ``build_tvm`` builds for (e.g. ``{"kind": "llvm", "opt-level": 0}``:
    the same numerics, built about three times faster).
    """
    import hyq_fx

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {"recipe": recipe}
    qgm = _timed(row, "quantize", lambda: hyq_fx.quantize(model, calib, recipe, progress=False))
    if qgm is None:
        return row
    with torch.no_grad():
        row["quantize"]["sqnr_vs_fp32_db"] = _sqnr_db(model(images), qgm(images))
    runtimes = {
        "onnx": lambda: _onnx_runtime(qgm, work),
        "torch_integer": lambda: integer_graph(qgm).eval(),
        "openvino": lambda: _openvino_runtime(qgm, work),
        "tvm": lambda: _tvm_runtime(qgm, work, images[:2], tvm_target),
    }
    for name in backends:
        if name == "onnx_fp32":
            result = _timed(row, name, lambda: _onnx_fp32(qgm, work, images))
            row[name].update(result or {})
            continue
        runtime = _timed(row, name, runtimes[name])
        if runtime is not None:
            row[name].update(compare(qgm, runtime, images))
    return row
