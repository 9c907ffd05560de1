"""Deployment backends: write a quantized hyq-fx GraphModule in a runtime's own format.

* :mod:`hyq_fx.backends.onnx_export` — portable ONNX: the integer graph
  (:mod:`hyq_fx.integer_graph`) through ``torch.onnx``, standard QDQ operators and int8 weights,
  for any architecture that quantizes (``export_onnx``, ``export_onnx_artifact``).
* :mod:`hyq_fx.backends.onnx_qdq` — ONNX tuned for ONNX Runtime, translated op by op:
  requantized convs (QLinearConv), SiLU on codes, contrib ops (``export_onnx_qdq``,
  ``export_artifact``), and ``OnnxRunner``; :mod:`~hyq_fx.backends.onnx_file` holds what both
  files share (names, metadata, the checked save). Its steps are modules of their own:
  ``onnx_qparams`` (quantizers in ONNX terms), ``onnx_requantize`` (requantization grids),
  ``onnx_record`` (shapes, constants), ``onnx_translate`` with the op table ``onnx_ops`` and
  its handlers (``onnx_ops_conv``, ``onnx_ops_math``, ``onnx_ops_shape``), ``onnx_builder``,
  ``onnx_ort_passes`` (rewrites for ONNX Runtime) and ``onnx_runner``; ``onnx_qdq`` re-exports
  their names.
* :mod:`hyq_fx.backends.tvm_relax` — TVM Relax with int8 × int8 → int32 conv/matmul kernels,
  built for llvm / aarch64 / cuda (``build_tvm``, ``export_tvm``, ``TvmRunner``): quantizers
  lowered and imported into Relax in ``tvm_lower``, the integer rewrite ``IntegerizeQDQ`` in
  ``tvm_integerize``, the runner and TVM's CUDA runtime in ``tvm_runner`` (all re-exported by
  ``tvm_relax``); its CPU pipeline and MetaSchedule tuning are in ``tvm_tuning``, its fast
  ``exp`` in ``tvm_fast_exp``.
* :mod:`hyq_fx.backends.tvm_deploy` — aarch64 libraries without an ARM machine: a C++ Relax VM
  runner (``deploy/relax_vm_runner.cc``) cross-built against TVM's aarch64 runtime, run under
  ``qemu-aarch64`` (``run_aarch64``), and a folder for a board (``write_bundle``).
"""
