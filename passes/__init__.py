"""hyq-fx passes: each module holds one GraphModule → GraphModule rewrite, registered by name."""

from . import calibrate, decompose_attention, fold_batchnorm, insert_quantizers

__all__ = ["calibrate", "decompose_attention", "fold_batchnorm", "insert_quantizers"]
