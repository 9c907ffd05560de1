"""``hyq-fx demo``: quantize the bundled MobileViT-XXS (CIFAR-10) with no data at all.

Calibration images are synthesised from the model's own BatchNorm statistics (ZeroQ, Cai et
al. CVPR 2020); a second, separately synthesised batch measures how closely the quantized
model follows the float one: top-1 agreement and the SQNR of the logits.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .artifact import atomic_output_dir, save
from .models import EMBEDDED_DEFAULT, load_model
from .quantize import META_KEY, quantize
from .report import sqnr_db
from .synth import synthesize_from_batchnorm

N_CALIB = 32
N_HELD_OUT = 16  # keeps the demo under two minutes on a 2-core CPU (synthesis dominates)


def run_demo(
    out: str | None = None,
    *,
    recipe: str = "minmax",
    w_bits: int = 8,
    a_bits: int = 8,
    steps: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    start = time.perf_counter()
    model, info = load_model(EMBEDDED_DEFAULT)
    size = tuple(info["pretrained_cfg"]["input_size"])
    kwargs = {"input_size": size, "progress": progress}
    if steps is not None:
        kwargs["steps"] = steps
    calib = synthesize_from_batchnorm(model, N_CALIB, seed=0, **kwargs)
    held_out = synthesize_from_batchnorm(model, N_HELD_OUT, seed=1, **kwargs)
    synth_seconds = time.perf_counter() - start
    qgm = quantize(model, calib, recipe, w_bits, a_bits, progress=progress)
    qgm.meta[META_KEY]["model_info"] = info
    with torch.no_grad():
        fp, q = model(held_out), qgm(held_out)
    result: dict[str, Any] = {
        "model": EMBEDDED_DEFAULT,
        "recipe": recipe,
        "w_bits": w_bits,
        "a_bits": a_bits,
        "calibration": f"{N_CALIB} images synthesised from BatchNorm statistics (ZeroQ)",
        "held_out": f"{N_HELD_OUT} other synthesised images",
        "top1_agreement": round((fp.argmax(1) == q.argmax(1)).float().mean().item() * 100, 2),
        "logit_sqnr_db": round(sqnr_db(fp, q), 2),
        "synth_seconds": round(synth_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "real_top1": (
            "for top-1 on real images: hyq-fx quantize embedded:mobilevit_xxs.cifar10 "
            "--calib CALIB_DIR --eval EVAL_DIR (ImageFolder of CIFAR-10, e.g. "
            "../shared/data/cifar10/{calib,dev})"
        ),
    }
    if out:
        with atomic_output_dir(out, overwrite=False) as staging:
            save(qgm, staging)
        result["out"] = str(out)
    return result
