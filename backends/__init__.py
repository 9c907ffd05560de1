"""Deployment backends: write a quantized hyq-fx GraphModule in a runtime's own format.

* :mod:`hyq_fx.backends.onnx_export` — portable ONNX: the integer graph
  (:mod:`hyq_fx.integer_graph`) through ``torch.onnx``, standard QDQ operators and int8 weights,
  for any architecture that quantizes (``export_onnx``, ``export_onnx_artifact``).
* :mod:`hyq_fx.backends.onnx_qdq` — ONNX tuned for ONNX Runtime, translated op by op:
  requantized convs (QLinearConv), SiLU on codes, contrib ops (``export_onnx_qdq``,
  ``export_artifact``), and ``OnnxRunner``; :mod:`~hyq_fx.backends.onnx_file` holds what both
  files share (names, metadata, the checked save).
* :mod:`hyq_fx.backends.tvm_relax` — TVM Relax with int8 × int8 → int32 conv/matmul kernels,
  built for llvm / aarch64 / cuda (``build_tvm``, ``export_tvm``, ``TvmRunner``); its CPU
  pipeline and MetaSchedule tuning are in ``tvm_tuning``, its fast ``exp`` in ``tvm_fast_exp``.
"""
