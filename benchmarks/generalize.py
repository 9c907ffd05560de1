"""Recipes on hybrid architectures they were never tuned on: logit error vs FP32.

No trained weights of other hybrids can be had offline, so each timm architecture is built
with its random initialisation and its BatchNorm statistics are settled on real images (the
ImageNet sample in ``../shared``). This is not an accuracy figure: it checks that a recipe goes
through an unseen graph and how far its logits move from the float model's, on images it did
not calibrate on: logit SQNR (dB, higher is better), top-1 agreement with FP32 (%) and
``KL(softmax(f) ‖ softmax(f_q))``.

    python benchmarks/generalize.py                      # default models, recipes, settings
    python benchmarks/generalize.py --models fastvit_t8 --settings W4A4 --limit 128

Rows are saved one by one to ``benchmarks/results/generalize.json`` (rerun to resume) and the
table to ``generalize.md``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from common import (
    RESULTS,
    SETTINGS,
    SHARED,
    ResultStore,
    command_line,
    machine,
    markdown_header,
)
from torch import nn
from torch.utils.data import DataLoader, Subset

import hyq_fx
from hyq_fx.data import image_folder
from hyq_fx.models import load_model
from hyq_fx.report import sqnr_db

# name -> (timm kwargs, input size); none of these is a model the recipes were measured on
MODELS = {
    "efficientformerv2_s0": ({"img_size": 128}, 128),
    "edgenext_xx_small": ({}, 128),
    "fastvit_t8": ({}, 128),
    "mobilevitv2_075": ({}, 128),
}


def settled_model(name: str) -> tuple[nn.Module, dict]:
    """The architecture with its random initialisation (seed 0), BatchNorm statistics
    averaged over 256 real images, in eval mode."""
    kwargs, size = MODELS[name]
    torch.manual_seed(0)
    model, info = load_model(name, pretrained=False, **kwargs)
    info = copy.deepcopy(info)
    info["pretrained_cfg"]["input_size"] = [3, size, size]
    info["pretrained_cfg"]["crop_pct"] = 1.0
    settle = image_folder(SHARED / "data" / "imagenet-sample", info, limit=256, seed=1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the settling batches
    model.train()
    with torch.no_grad():
        for x, _ in DataLoader(settle, batch_size=32):
            model(x)
    return model.eval(), info


def split(info: dict, limit: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """256 calibration images and ``limit`` others for evaluation, from the ImageNet sample."""
    data = image_folder(SHARED / "data" / "imagenet-sample", info)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    calib = [x for x, _ in DataLoader(Subset(data, order[:256]), batch_size=32)]
    evaluation = torch.cat([x for x, _ in DataLoader(Subset(data, order[256 : 256 + limit]), 64)])
    return calib, evaluation


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(b) for b in x.split(64)])


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict:
    kl = torch.nn.functional.kl_div(
        got.double().log_softmax(-1), ref.double().log_softmax(-1), log_target=True,
        reduction="batchmean",
    )  # fmt: skip
    return {
        "sqnr_db": round(float(sqnr_db(ref, got)), 2),
        "agreement": round(float((ref.argmax(1) == got.argmax(1)).double().mean()) * 100, 2),
        "kl": float(kl),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--recipes", nargs="+", default=["minmax", "hyq-fx"])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--limit", type=int, default=256, help="evaluation images (of 744)")
    p.add_argument("--out", default=str(RESULTS / "generalize"), help="results path stem")
    args = p.parse_args()
    store = ResultStore(Path(args.out + ".json"))
    store.data["machine"] = machine()
    store.data["command"] = command_line()
    for name in args.models:
        model, info = settled_model(name)
        calib, evaluation = split(info, args.limit)
        ref = logits(model, evaluation)
        for recipe in args.recipes:
            for setting in args.settings:
                key = f"{name}|{recipe}|{setting}|{args.limit}"
                if store.has(key):
                    continue
                w_bits, a_bits = SETTINGS[setting]
                start = time.perf_counter()
                qgm = hyq_fx.quantize(model, calib, recipe, w_bits, a_bits, progress=False)
                seconds = time.perf_counter() - start
                row = {"model": name, "recipe": recipe, "setting": setting,
                       "calib_seconds": round(seconds, 1), "n_eval": len(evaluation),
                       **compare(ref, logits(qgm, evaluation))}  # fmt: skip
                store.put(key, row)
                print(row, flush=True)
    write_markdown(store, Path(args.out + ".md"))


def write_markdown(store: ResultStore, path: Path) -> None:
    rows = list(store.data["rows"].values())
    lines = [
        *markdown_header(
            "Recipes on unseen hybrid architectures (random init, BN settled on real images)",
            store.data,
        ),
        "Not accuracy: the weights are timm's random initialisation with BatchNorm statistics "
        "averaged over 256 ImageNet-sample images; 256 other images calibrate, the rest "
        "(`n_eval`) are compared with the FP32 model. Cells: logit SQNR dB / top-1 agreement "
        "with FP32 % / calibration s.",
        "",
    ]
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    lines += ["| model | recipe | " + " | ".join(settings) + " |"]
    lines += ["|---|---|" + "---|" * len(settings)]
    pairs = sorted({(r["model"], r["recipe"]) for r in rows})
    for model, recipe in pairs:
        cells = []
        for s in settings:
            r = next((r for r in rows if (r["model"], r["recipe"], r["setting"]) ==
                      (model, recipe, s)), None)  # fmt: skip
            cells.append(
                f"{r['sqnr_db']:.1f} / {r['agreement']:.1f} / {r['calib_seconds']:.0f}"
                if r else "—"
            )  # fmt: skip
        lines.append(f"| {model} | {recipe} | " + " | ".join(cells) + " |")
    n_eval = sorted({r["n_eval"] for r in rows})
    lines += ["", f"Evaluated on {n_eval} images per model."]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
