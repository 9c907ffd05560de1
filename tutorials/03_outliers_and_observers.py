# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 03 · Outliers in an MV2 bottleneck, and what observers do about them
#
# Q-HyViT's first problem: activation ranges differ strongly between channels. A per-tensor
# quantizer must cover the widest channel, so narrow channels get few levels. We look at the
# input of the 1x1 projection conv of MobileViT's inverted bottlenecks (MV2), compare the
# observers (min-max, percentile, MSE), then run HyQ's outlier scaling
# (`scale_bottleneck_outliers`) and plot the per-channel ranges before and after.

# %%
import copy
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import hyq_fx  # noqa: E402
from hyq_fx.fake_quant import quantize_with_spec  # noqa: E402
from hyq_fx.observers import make_observer  # noqa: E402
from hyq_fx.pass_base import (  # noqa: E402
    QuantContext,
    get_pass,
    quantizers,
    record_node_outputs,
    run_passes,
)
from hyq_fx.spec import QuantSpec  # noqa: E402

OUT = Path(os.environ.get("HYQ_TUTORIAL_OUT", "tutorials/_out"))
OUT.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
model, info = hyq_fx.models.load_model("embedded:mobilevit_xxs.cifar10")

calib_dir = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10" / "calib"
if calib_dir.is_dir():  # real CIFAR-10 images when ../shared is there
    from hyq_fx.data import image_folder, make_loader

    images = next(iter(make_loader(image_folder(calib_dir, info, limit=64), batch_size=64)))[0]
    print("calibration: 64 real CIFAR-10 images from", calib_dir)
else:  # otherwise images synthesised from the BatchNorm statistics (ZeroQ)
    from hyq_fx.synth import synthesize_from_batchnorm

    images = synthesize_from_batchnorm(model, 16, steps=20, progress=False)
    print("calibration: 16 ZeroQ-synthesised images")

# %% [markdown]
# ## The graph, quantizers inserted and calibrated (the `minmax` baseline)

# %%
ctx = QuantContext([images[:32], images[32:]] if len(images) > 32 else [images], w_bits=4,
                   a_bits=8, progress=False)  # fmt: skip
gm = hyq_fx.capture(model, images[:2])
steps = ("decompose_attention", "fold_batchnorm", "insert_quantizers", "calibrate")
gm = run_passes(gm, [get_pass(name)(ctx) for name in steps])
# the MV2 projection convs: 1x1, groups 1, fed by a depthwise conv's activation
projections = [
    n for n in gm.graph.nodes
    if n.target is torch.ops.aten.conv2d.default and "conv3_1x1" in n.meta["hyq_module_path"]
]  # fmt: skip
fq_node = projections[1].args[0]  # the activation quantizer in front of it
x_node = fq_node.args[0]
x = record_node_outputs(gm, images, [x_node.name])[x_node.name]
print("layer:", projections[1].meta["hyq_module_path"], "input", tuple(x.shape))
per_channel = x.transpose(0, 1).reshape(x.shape[1], -1)
lo, hi = per_channel.amin(1), per_channel.amax(1)
print(
    f"channel ranges: widest {float((hi - lo).max()):.2f}, narrowest {float((hi - lo).min()):.2f}"
)

# %% [markdown]
# ## Observers at 4 and 8 bits
# The quantization MSE of this activation with each observer's range.

# %%
print("observer    4-bit MSE   8-bit MSE")
for observer in ("minmax", "percentile", "mse"):
    errors = []
    for bits in (4, 8):
        spec = QuantSpec(bits=bits)
        obs = make_observer(observer, spec)
        obs.observe(x)
        xq = quantize_with_spec(x, spec, *obs.range_for(spec))
        errors.append((xq - x).pow(2).mean().item())
    print(f"{observer:10s}  {errors[0]:.3e}   {errors[1]:.3e}")

# %% [markdown]
# ## Outlier scaling
# `scale_bottleneck_outliers` learns one factor α_c per input channel so that quantizing x/α
# and W·α loses the least of `conv(x, W)`. Here a SiLU sits between the depthwise conv and the
# projection, so α cannot be folded through it exactly: the quantizer becomes per-channel with
# scales s·α_c (an integer kernel applies α to the weights). We plot the effective per-channel
# ranges the quantizer sees, before and after, and the layer's output SQNR.

# %%
before = copy.deepcopy(gm)
gm = run_passes(gm, [get_pass("scale_bottleneck_outliers")(ctx, steps=150)])
fq = gm.get_submodule(fq_node.target)
if fq.spec.per_channel:
    alpha = (fq.scale / fq.scale.mean()).detach()
else:
    alpha = torch.ones_like(lo)
ranges_before = hi - lo
ranges_after = ranges_before / alpha


def layer_sqnr(module):
    rows = hyq_fx.report.layer_report(module, images[:16])
    return next(r["sqnr_db"] for r in rows if r["node"] == projections[1].name)


print(f"output SQNR of the layer at W4A8: before {layer_sqnr(before):.2f} dB, "
      f"after {layer_sqnr(gm):.2f} dB")  # fmt: skip
order = torch.argsort(ranges_before, descending=True)
fig, ax = plt.subplots(figsize=(9, 3.5))
ax.bar(range(len(order)), ranges_before[order], label="x (before)", alpha=0.6)
ax.bar(range(len(order)), ranges_after[order], label="x/α (after)", alpha=0.6)
ax.set_xlabel("input channel (sorted by range)")
ax.set_ylabel("max − min")
ax.set_title(f"{projections[1].meta['hyq_module_path']}: per-channel input ranges")
ax.legend()
fig.savefig(OUT / "03_channel_ranges.png", dpi=120, bbox_inches="tight")
print("wrote", OUT / "03_channel_ranges.png")
print("quantizers in the graph:", len(quantizers(gm)))
