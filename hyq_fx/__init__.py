"""hyq-fx: torch.fx passes for post-training quantization of hybrid CNN-Transformer models."""

from .capture import CaptureError, capture
from .spec import QuantSpec

__all__ = ["CaptureError", "QuantSpec", "capture"]
__version__ = "0.1.0"
