"""hyq-fx: torch.fx passes for post-training quantization of hybrid CNN-Transformer models."""

from . import models
from .artifact import load, save
from .capture import CaptureError, capture
from .pass_base import PASSES, HyqPass, PassResult, QuantContext, register_pass
from .quantize import quantize
from .quantizer import FakeQuantizer
from .recipes import RECIPES, Recipe, get_recipe, register_recipe
from .recipes import _register_builtin as _register_builtin_recipes
from .spec import QuantSpec

_register_builtin_recipes()

__all__ = [
    "PASSES",
    "RECIPES",
    "CaptureError",
    "FakeQuantizer",
    "HyqPass",
    "PassResult",
    "QuantContext",
    "QuantSpec",
    "Recipe",
    "capture",
    "load",
    "models",
    "save",
    "get_recipe",
    "quantize",
    "register_pass",
    "register_recipe",
]
__version__ = "0.1.0"
