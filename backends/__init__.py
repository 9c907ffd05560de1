"""Deployment backends: write a quantized hyq-fx GraphModule in a runtime's own format.

* :mod:`hyq_fx.backends.onnx_qdq` — ONNX with QuantizeLinear/DequantizeLinear (QDQ) pairs and
  int8 weights, run with ONNX Runtime (``export_onnx_qdq``, ``export_artifact``,
  ``OnnxRunner``).
* :mod:`hyq_fx.backends.tvm_relax` — TVM Relax with int8 × int8 → int32 conv/matmul kernels,
  built for llvm / aarch64 / cuda (``build_tvm``, ``export_tvm``, ``TvmRunner``); its CPU
  pipeline and MetaSchedule tuning are in ``tvm_tuning``, its fast ``exp`` in ``tvm_fast_exp``.
"""
