# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 04 · Recipes compared at W4A8, and every recipe from the benchmark
#
# A recipe is a JSON list of passes. Here we calibrate both shared CIFAR-10 checkpoints
# (MobileViT-XXS with LayerNorm, MobileViT-v2-0.5 with GroupNorm(1, C)) with the naive `minmax`
# recipe and with RepQ-ViT's `repq` (norm-scale reparameterization + percentile clipping) at
# W4A8, then compare top-1, the FP32/quantized logit SQNR and the per-layer SQNR.
#
# To run in a few minutes on a 2-core CPU this calibrates on 32 images and evaluates on 100
# (top-1 on 100 images moves in steps of 1 point and has a standard error of about 3.6, so the
# logit SQNR is the steadier signal here). The full comparison, every recipe at W8A8, W6A6, W4A8
# and W4A4 on all 5000 dev images, is `benchmarks/accuracy.py`; its stored results are printed
# at the end. Add recipes to `RECIPES` (or settings to `SETTINGS`) to compare more live.
# Without `../shared` the bundled MobileViT-XXS is used with images synthesised from its
# BatchNorm statistics, and top-1 becomes agreement with FP32.

# %%
import copy
import glob
import json
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import hyq_fx  # noqa: E402
from hyq_fx.pass_base import QuantContext, run_passes  # noqa: E402
from hyq_fx.report import layer_report, sqnr_db  # noqa: E402

torch.manual_seed(0)
OUT = Path(os.environ.get("HYQ_TUTORIAL_OUT", "tutorials/_out"))
OUT.mkdir(parents=True, exist_ok=True)
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RECIPES = ["minmax", "repq"]
SETTINGS = {"W4A8": (4, 8)}
N_CALIB, N_EVAL = 32, 100
for name in RECIPES:
    recipe = hyq_fx.get_recipe(name)
    print(f"{name:7s} passes: {' → '.join(p['pass'] for p in recipe.to_dict()['passes'])}")


# %% [markdown]
# ## Data: calibration images and a class-balanced evaluation subset


# %%
def load_data(model, info):
    """(calibration images, evaluation images, labels, what the score means)."""
    cifar = SHARED / "data" / "cifar10"
    if cifar.is_dir():
        from hyq_fx.data import image_folder

        def batch(split, n):
            ds = image_folder(cifar / split, info, limit=n)
            images, labels = zip(*(ds[i] for i in range(len(ds))), strict=True)
            return torch.stack(images), torch.tensor(labels)

        calib, _ = batch("calib", N_CALIB)
        images, labels = batch("dev", N_EVAL)
        return calib, images, labels, f"top-1 on {N_EVAL} CIFAR-10 dev images"
    from hyq_fx.synth import synthesize_from_batchnorm

    calib = synthesize_from_batchnorm(model, N_CALIB, steps=20, progress=False)
    images = synthesize_from_batchnorm(model, 64, steps=20, seed=1, progress=False)
    with torch.no_grad():
        labels = model(images).argmax(1)
    return calib, images, labels, "agreement with FP32 on 64 synthesised images"


NAMES = ("mobilevit_xxs.cifar10", "mobilevitv2_050.cifar10")
checkpoints = [SHARED / "checkpoints" / c for c in NAMES]
MODELS = {
    c.name: f"local-dir:{c}" for c in checkpoints if c.is_dir()
} or {"mobilevit_xxs.cifar10 (bundled)": "embedded:mobilevit_xxs.cifar10"}  # fmt: skip

# %% [markdown]
# ## Quantize each model with each recipe at each setting
# `hyq_fx.quantize(model, calib, recipe, w, a)` captures the model with `torch.export`, then
# runs the recipe's passes on the captured graph. Capture is the slow part (about 5 s here), and
# it does not depend on the recipe, so we capture each model once and run each recipe on a copy
# of the graph: the same passes on the same graph that `hyq_fx.quantize` would run.


# %%
def quantize_captured(gm, calib, recipe, w_bits, a_bits):
    torch.manual_seed(0)
    ctx = QuantContext([calib], w_bits=w_bits, a_bits=a_bits, seed=0, progress=False)
    return run_passes(copy.deepcopy(gm), hyq_fx.get_recipe(recipe).build(ctx)).eval()


rows, layers = [], {}
for model_name, spec in MODELS.items():
    model, info = hyq_fx.models.load_model(spec)
    calib, images, labels, metric = load_data(model, info)
    with torch.no_grad():
        fp_logits = model(images)
    fp_top1 = (fp_logits.argmax(1) == labels).float().mean().item() * 100
    print(f"\n{model_name}: FP32 {fp_top1:.1f} ({metric})")
    captured = hyq_fx.capture(model, calib[:2])
    for setting, (w, a) in SETTINGS.items():
        for recipe in RECIPES:
            start = time.perf_counter()
            qgm = quantize_captured(captured, calib, recipe, w, a)
            seconds = time.perf_counter() - start
            with torch.no_grad():
                q_logits = qgm(images)
            row = {
                "model": model_name, "setting": setting, "recipe": recipe,
                "top1": (q_logits.argmax(1) == labels).float().mean().item() * 100,
                "fp32_top1": fp_top1, "logit_sqnr": sqnr_db(fp_logits, q_logits),
                "seconds": seconds,
            }  # fmt: skip
            rows.append(row)
            layers[model_name, setting, recipe] = layer_report(qgm, calib[:4])
            print(f"  {setting} {recipe:7s} top-1 {row['top1']:5.1f}  "
                  f"logit SQNR {row['logit_sqnr']:5.1f} dB  ({seconds:.0f} s)")  # fmt: skip

# %% [markdown]
# ## The table
# Drop is in top-1 points against FP32 on the same images; the logit SQNR is
# `10·log10(Σ z² / Σ (z − ẑ)²)` between the FP32 and the quantized logits.

# %%
print(f"\n{'model':26s} {'setting':7s} {'recipe':7s} {'top-1':>6s} {'drop':>6s} {'SQNR dB':>8s}")
for r in rows:
    print(f"{r['model']:26s} {r['setting']:7s} {r['recipe']:7s} {r['top1']:6.1f} "
          f"{r['fp32_top1'] - r['top1']:6.1f} {r['logit_sqnr']:8.1f}")  # fmt: skip
(OUT / "04_recipes.json").write_text(json.dumps(rows, indent=2))

# %% [markdown]
# ## Per-layer SQNR at W4A8
# The SQNR of each quantized op's output against the float graph. Errors accumulate, so it
# tends to fall with depth; the dips are the layers a recipe must fix. On MobileViT the worst
# ops sit inside the attention of the transformer stages.

# %%
fig, axes = plt.subplots(len(MODELS), 1, figsize=(11, 3.3 * len(MODELS)), squeeze=False)
for ax, model_name in zip(axes[:, 0], MODELS, strict=True):
    for recipe in RECIPES:
        rep = layers[model_name, "W4A8", recipe]
        ax.plot([r["sqnr_db"] for r in rep], label=recipe, lw=1)
        worst = min(rep, key=lambda r: r["sqnr_db"])
        print(f"{model_name} W4A8 {recipe}: worst layer {worst['name']} "
              f"({worst['node']}) at {worst['sqnr_db']:.1f} dB, "
              f"median {sorted(r['sqnr_db'] for r in rep)[len(rep) // 2]:.1f} dB")  # fmt: skip
    ax.set_title(f"{model_name}, W4A8: per-layer output SQNR", fontsize=10)
    ax.set_ylabel("SQNR (dB)")
    ax.legend()
axes[-1, 0].set_xlabel("quantized op (graph order)")
fig.tight_layout()
fig.savefig(OUT / "04_sqnr_per_layer.png", dpi=110)
print("wrote", OUT / "04_sqnr_per_layer.png")

# %% [markdown]
# ## The full comparison from the benchmark
# `benchmarks/accuracy.py` runs every recipe on 256 calibration images and all 5000 dev images;
# its stored results (`benchmarks/results/accuracy.json`, if this checkout has it) are the
# numbers to quote.

# %%
stored = {}
for path in glob.glob(str(ROOT / "benchmarks" / "results" / "accuracy.json")):
    for row in json.loads(Path(path).read_text())["rows"].values():
        if "recipe" in row:
            stored[row["model"], row["recipe"], row["setting"]] = row["quant_top1"]
if stored:
    columns = ("W8A8", "W6A6", "W4A8", "W4A4")
    print(f"\n{'model':26s} {'recipe':11s} " + " ".join(f"{c:>6s}" for c in columns))
    for model_name, recipe in sorted({(m, r) for m, r, _ in stored}):
        cells = [stored.get((model_name, recipe, s)) for s in columns]
        text = " ".join(f"{c:6.1f}" if c is not None else f"{'—':>6s}" for c in cells)
        print(f"{model_name:26s} {recipe:11s} {text}")
else:
    print("no stored benchmark results in this checkout (run benchmarks/accuracy.py)")
