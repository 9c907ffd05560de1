"""Deployment backends: write a quantized hyq-fx GraphModule in a runtime's own format.

* :mod:`hyq_fx.backends.onnx_qdq` — ONNX with QuantizeLinear/DequantizeLinear (QDQ) pairs and
  int8 weights, run with ONNX Runtime (``export_onnx_qdq``, ``export_artifact``,
  ``OnnxRunner``).
"""
