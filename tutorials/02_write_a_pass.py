# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 02 · Write a pass: BN folding and LayerNorm scale reparameterization
#
# A hyq-fx pass is a `torch.fx` `PassBase`: `requires` (precondition), `call` (the rewrite,
# returning `PassResult(gm, modified)`) and `ensures` (postcondition). The pattern is declared
# once, TVM-Relax style, and every match is rewritten in one loop. We write BatchNorm folding
# from scratch, prove it exact, then do the same for RepQ-ViT's LayerNorm reparameterization,
# and finally put our pass in a recipe.

# %%
import copy
import os
from pathlib import Path

import torch

import hyq_fx
from hyq_fx.pass_base import HyqPass, PassResult, add_constant, get_tensor, register_pass
from hyq_fx.patterns import is_const, is_op, match_all, wildcard

aten = torch.ops.aten
OUT = Path(os.environ.get("HYQ_TUTORIAL_OUT", "tutorials/_out"))
OUT.mkdir(parents=True, exist_ok=True)

model, info = hyq_fx.models.load_model("embedded:mobilevit_xxs.cifar10")
gm = hyq_fx.capture(model, torch.randn(2, 3, 128, 128))
x = torch.randn(4, 3, 128, 128)
with torch.no_grad():
    reference = gm(x)

# %% [markdown]
# ## 1. The pattern
# `BN(conv(x, W, b))` where the conv output feeds nothing else. `...` leaves the remaining
# arguments (stride, padding; momentum, eps) unconstrained; `.named` binds nodes for the rewrite.

# %%
conv = is_op(aten.conv2d.default).only_used_once()(wildcard(), is_const(), ...).named("conv")
bn = is_op(aten.batch_norm.default)(
    conv, is_const().named("gamma"), is_const().named("beta"),
    is_const().named("mean"), is_const().named("var"), ...
).named("bn")  # fmt: skip
print("conv→BN matches:", len(list(match_all(gm, bn))))

# %% [markdown]
# ## 2. The rewrite
# Per output channel c, with σ_c = sqrt(var_c + ε):
# `W'_c = W_c·γ_c/σ_c` and `b'_c = (b_c − μ_c)·γ_c/σ_c + β_c`.

# %%


@register_pass
class TutorialFoldBN(HyqPass):
    """Fold BatchNorm into the conv before it (tutorial version)."""

    name = "tutorial_fold_bn"

    def call(self, gm):
        modified = False
        for m in match_all(gm, bn):
            c, b = m["conv"], m["bn"]
            weight = get_tensor(gm, c.args[1])
            bias = (
                get_tensor(gm, c.args[2])
                if len(c.args) > 2 and c.args[2] is not None
                else torch.zeros(weight.shape[0])
            )
            gamma, beta = get_tensor(gm, m["gamma"]), get_tensor(gm, m["beta"])
            mean, var, eps = get_tensor(gm, m["mean"]), get_tensor(gm, m["var"]), b.args[7]
            factor = gamma / torch.sqrt(var + eps)
            new_w = add_constant(gm, "w_folded", weight * factor[:, None, None, None], c)
            new_b = add_constant(gm, "b_folded", (bias - mean) * factor + beta, c)
            args = list(c.args) + [None] * (3 - len(c.args))
            args[1], args[2] = new_w, new_b
            c.args = tuple(args)
            b.replace_all_uses_with(c)
            gm.graph.erase_node(b)
            modified = True
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return PassResult(gm, modified)

    def ensures(self, gm):
        for node in gm.graph.nodes:
            if (
                node.target is aten.batch_norm.default
                and node.args[0].target is aten.conv2d.default
            ):
                raise AssertionError(f"{node.name} still follows a conv")


# %% [markdown]
# ## 3. Prove it exact
# An exact rewrite must reproduce the outputs (here to 1e-5).

# %%
folded = copy.deepcopy(gm)
result = TutorialFoldBN()(folded)
with torch.no_grad():
    err = (folded(x) - reference).abs().max().item()
n_bn = sum(n.target is aten.batch_norm.default for n in folded.graph.nodes)
print(f"modified={result.modified}, BatchNorms left={n_bn}, max |Δ| = {err:.2e}")
assert err < 1e-4

# %% [markdown]
# ## 4. LayerNorm scale reparameterization (RepQ-ViT), by hand, on one LayerNorm → Linear
# Post-LayerNorm activations have very different ranges per channel, which a per-tensor
# quantizer handles badly. With per-channel factors r_c and offsets b_c:
# `LN'(x) = (LN(x) − b)/r` (so γ ← γ/r, β ← (β − b)/r) and the next linear absorbs them:
# `W' = W·diag(r)`, `bias' = bias + W·b`. Nothing changes in float; only the quantizer's view
# of the activation does.

# %%
ln = next(n for n in gm.graph.nodes if n.target is aten.layer_norm.default)
lin = next(iter(ln.users))
print("LayerNorm", ln.meta["hyq_module_path"], "→", lin.target.__name__)
with torch.no_grad():
    tokens = hyq_fx.pass_base.record_node_outputs(gm, x, [ln.name])[ln.name]
flat = tokens.reshape(-1, tokens.shape[-1])
lo, hi = flat.amin(0), flat.amax(0)
r = (hi - lo) / (hi - lo).mean()
b = lo - r * lo.mean()
spread = lambda t: ((t.amax(0) - t.amin(0)).max() / (t.amax(0) - t.amin(0)).min()).item()  # noqa: E731
print(f"channel-range ratio before: {spread(flat):.1f}, after: {spread((flat - b) / r):.2f}")
W = get_tensor(gm, lin.args[1])
y_before = torch.nn.functional.linear(flat, W)
y_after = torch.nn.functional.linear((flat - b) / r, W * r) + W @ b
print("linear output unchanged: max |Δ| =", (y_after - y_before).abs().max().item())

# %% [markdown]
# The library's `reparameterize_norm_scales` pass does this for every LayerNorm, GroupNorm(1,C)
# and LayerNorm2d whose consumers can absorb the factors.

# %% [markdown]
# ## 5. Put the pass in a recipe
# A recipe is data: a JSON list of passes with arguments. Registered passes are available by
# name.

# %%
recipe = hyq_fx.register_recipe({
    "name": "tutorial",
    "description": "our BN folding, then the minmax quantizers",
    "passes": [
        {"pass": "decompose_attention"},
        {"pass": "tutorial_fold_bn"},
        {"pass": "insert_quantizers"},
        {"pass": "calibrate"},
    ],
})  # fmt: skip
(OUT / "02_recipe.json").write_text(recipe.to_json())
print(recipe.to_json())
calib = [torch.randn(8, 3, 128, 128)]
qgm = hyq_fx.quantize(model, calib, "tutorial", w_bits=8, a_bits=8, progress=False)
with torch.no_grad():
    agree = (qgm(x).argmax(1) == model(x).argmax(1)).float().mean().item()
print(f"W8A8 with our pass: top-1 agreement with FP32 on 4 random inputs = {agree:.2f}")
