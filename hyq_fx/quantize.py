"""The quantize API: capture, run a recipe's passes, return a new fake-quant GraphModule."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from .capture import capture
from .nonfinite import NonFiniteError, first_nonfinite_node, nonfinite_message
from .pass_base import PassError, QuantContext, run_passes
from .recipes import Recipe, get_recipe
from .spec import QuantSpec, QuantSpecError
from .vocabulary import META_KEY, quantizers, quantizers_mode

# ``META_KEY`` and ``quantizers_mode`` live in :mod:`hyq_fx.vocabulary`; they stay importable
# from here, where callers have long imported them.
__all__ = [
    "META_KEY",
    "CalibrationDataError",
    "collect_batches",
    "deployed_meta",
    "input_shape",
    "quantize",
    "quantizers_mode",
]


class CalibrationDataError(ValueError):
    """Calibration data that cannot be used."""


def collect_batches(
    data: Any, limit: int | None = None, batch_size: int = 32
) -> list[torch.Tensor]:
    """Calibration images as a list of float batches ``[N, C, H, W]``.

    ``data`` may be a tensor of images, a list of tensors, or an iterable (a DataLoader) of
    tensors or ``(images, labels)`` pairs. ``limit`` caps the number of images.
    """
    if isinstance(data, torch.Tensor):
        data = list(data.split(batch_size))
    batches: list[torch.Tensor] = []
    seen = 0
    if not isinstance(data, Iterable):
        raise CalibrationDataError(
            f"calibration data must be a tensor, a list of tensors or a DataLoader, "
            f"got {type(data).__name__}"
        )
    for item in data:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise CalibrationDataError(
                f"calibration batch {len(batches)} is not a float image tensor "
                f"(got {type(x).__name__}); yield images [N, C, H, W] or (images, labels)"
            )
        if limit is not None and seen + x.shape[0] > limit:
            x = x[: limit - seen]
        if not torch.isfinite(x).all():
            rows = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(dim=1).nonzero().flatten()
            raise CalibrationDataError(
                f"calibration batch {len(batches)} holds NaN/Inf values (image(s) "
                f"{rows[:5].tolist()} of the batch): the input itself is not finite; check the "
                "images and their preprocessing (mean/std, division by zero)"
            )
        if x.shape[0]:
            batches.append(x)
            seen += x.shape[0]
        if limit is not None and seen >= limit:
            break
    if not batches:
        raise CalibrationDataError(
            "no calibration images: the calibration data is empty (check the folder or loader)"
        )
    return batches


def _raise_if_nonfinite(
    model: nn.Module, example: torch.Tensor, batches: list[torch.Tensor], exc: Exception
) -> None:
    """After a failed recipe: if the *float* model yields NaN/Inf on the calibration data,
    raise ``NonFiniteError`` naming the first node where it appears (the recipe's own error
    is then only a consequence). Only runs on the error path, so it costs nothing otherwise."""
    if isinstance(exc, NonFiniteError):
        return
    try:
        float_gm = capture(model, example[:2])
        with torch.no_grad():
            found = [
                (i, first_nonfinite_node(float_gm, batch))
                for i, batch in enumerate(batches)
                if not torch.isfinite(float_gm(batch)).all()
            ][:1]
    except Exception:  # the diagnosis is best effort; the original error stands
        return
    if found:
        i, node = found[0]
        raise NonFiniteError(
            f"{nonfinite_message(node, i)} (in the float model, before quantization; the "
            f"recipe then failed with: {exc})"
        ) from exc


def input_shape(gm: fx.GraphModule) -> tuple[int, ...] | None:
    """The ``C×H×W`` (without batch) ``gm`` was quantized at: as :func:`quantize` recorded it,
    else (a model saved before it recorded one) its preprocessing's input size."""
    meta = gm.meta.get(META_KEY, {})
    shape = meta.get("input_shape")
    if not shape and meta.get("model_info"):
        from .data import preprocess_config

        shape = preprocess_config(meta["model_info"])["input_size"]
    return tuple(int(d) for d in shape) if shape else None


def deployed_meta(gm: fx.GraphModule) -> dict[str, Any]:
    """``gm.meta["hyq"]`` for a deployed file: its preprocessing resizes images to the size the
    model was quantized at (a timm model quantized at 128x128 keeps a 256x256 default cfg)."""
    meta = dict(gm.meta.get(META_KEY, {}))
    shape, info = input_shape(gm), meta.get("model_info")
    if shape and info:
        cfg = {**info.get("pretrained_cfg", {}), "input_size": list(shape)}
        meta["model_info"] = {**info, "pretrained_cfg": cfg}
    return meta


def quantize(
    model: nn.Module,
    calib_data: Any,
    recipe: str | Recipe = "minmax",
    w_bits: int = 8,
    a_bits: int = 8,
    *,
    calib_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> fx.GraphModule:
    """Quantize ``model`` with ``recipe`` and return a new fake-quant GraphModule.

    The model is captured from a deep copy; neither its parameters nor its training flag
    change. ``calib_data`` is a DataLoader, a tensor or a list of image batches.
    """
    for what, bits in (("w_bits", w_bits), ("a_bits", a_bits)):
        try:
            QuantSpec(bits=bits)
        except QuantSpecError as exc:
            raise QuantSpecError(f"{what}: {exc}") from None
    recipe = get_recipe(recipe)
    batches = collect_batches(calib_data, calib_size)
    torch.manual_seed(seed)
    ctx = QuantContext(batches, w_bits=w_bits, a_bits=a_bits, seed=seed, progress=progress)
    passes = recipe.build(ctx)  # fails on a bad recipe before the (slower) capture
    example = batches[0]
    if example.shape[0] < 2:  # a batch of one would specialise the batch dimension
        example = example.repeat(2, *([1] * (example.dim() - 1)))
    start = time.perf_counter()
    gm = capture(model, example[:2])
    try:
        gm = run_passes(gm, passes)
        bad = [n for n, fq in quantizers(gm).items() if not torch.isfinite(fq.scale).all()]
        if bad:
            raise PassError(
                f"recipe {recipe.name!r} left {len(bad)} quantizer(s) with a non-finite scale "
                f"({', '.join(bad[:5])})"
            )
    except Exception as exc:
        _raise_if_nonfinite(model, example, batches, exc)
        raise
    gm.eval()
    gm.meta[META_KEY] = {
        "recipe": recipe.to_dict(),
        "w_bits": w_bits,
        "a_bits": a_bits,
        "seed": seed,
        "n_calib": sum(b.shape[0] for b in batches),
        "calib_seconds": round(time.perf_counter() - start, 3),
        "input_shape": list(example.shape[1:]),
    }
    return gm
