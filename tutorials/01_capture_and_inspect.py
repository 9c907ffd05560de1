# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 01 · Capture a hybrid model and look at its graph
#
# `torch.fx.symbolic_trace` fails on MobileViT (its unfolding branches on shapes);
# `torch.export` traces it. `hyq_fx.capture` wraps `torch.export`, keeps the module each ATen op
# came from (`meta["hyq_module_path"]`), makes in-place ops functional and leaves the batch
# dimension symbolic. Here we capture the bundled MobileViT-XXS (CIFAR-10), walk the graph with
# networkx, find its normalization variants and its conv→transformer bridges, and draw one
# MobileViT block.

# %%
import collections
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402
import torch  # noqa: E402

import hyq_fx  # noqa: E402
from hyq_fx.graph import (  # noqa: E402
    detect_norms,
    find_transitions,
    op_counts,
    subgraph_for_module,
    to_dot,
    to_networkx,
)

OUT = Path(os.environ.get("HYQ_TUTORIAL_OUT", "tutorials/_out"))
OUT.mkdir(parents=True, exist_ok=True)

model, info = hyq_fx.models.load_model("embedded:mobilevit_xxs.cifar10")
gm = hyq_fx.capture(model, torch.randn(2, *info["pretrained_cfg"]["input_size"]))
x = torch.randn(3, 3, 128, 128)
with torch.no_grad():
    print("max |captured - eager| =", (gm(x) - model(x)).abs().max().item())

# %% [markdown]
# ## The ops
# ATen-level: convolutions and linears, BatchNorm (not yet folded), LayerNorm, and the fused
# `scaled_dot_product_attention` that `decompose_attention` will later split open.

# %%
for op, n in sorted(op_counts(gm).items(), key=lambda kv: -kv[1])[:12]:
    print(f"{n:4d}  {op}")

# %% [markdown]
# ## A networkx view
# Every fx node becomes a graph node carrying its op, module path and shape: a pass can ask
# graph questions (paths, ancestors, components) instead of walking `node.users` by hand.

# %%
g = to_networkx(gm)
print(g.number_of_nodes(), "nodes,", g.number_of_edges(), "edges")
sdpa = [n for n, d in g.nodes(data=True) if d["name"] == "scaled_dot_product_attention"]
first = sdpa[0]
print("first attention:", first, g.nodes[first]["module_path"], g.nodes[first]["shape"])
convs_before = [a for a in nx.ancestors(g, first) if g.nodes[a]["name"] == "conv2d"]
print("convolutions upstream of it:", len(convs_before))

# %% [markdown]
# ## Normalization variants
# Q-HyViT's third problem: hybrids mix norms, and each needs its own treatment (BN folds into
# the conv; LayerNorm over channels needs scale reparameterization).

# %%
print(collections.Counter(n.kind for n in detect_norms(gm)))

# %% [markdown]
# ## Conv → transformer bridges
# Found from the graph alone: where a 4-D feature map is reshaped into tokens that reach an
# attention op, and where tokens fold back into a map.

# %%
transitions = find_transitions(gm)
for t in transitions:
    print(f"{t.kind:18s} block={t.block:12s} {t.entry} -> {t.exit}  {t.in_shape} -> {t.out_shape}")

# %% [markdown]
# ## Draw one MobileViT block
# The DOT file is for Graphviz; the PNG is drawn with networkx + matplotlib, layered by
# topological generation.

# %%
block = transitions[0].block
sub = subgraph_for_module(gm, block)
keep = [n for n, d in sub.nodes(data=True) if d["op"] == "call_function" and d.get("tensor")]
sub = sub.subgraph(keep).copy()  # tensors only: no weights, no symbolic-size arithmetic
for layer, nodes in enumerate(nx.topological_generations(sub)):
    for n in nodes:
        sub.nodes[n]["layer"] = layer
pos = nx.multipartite_layout(sub, subset_key="layer")  # layer → x; we want it top-down
pos = {n: (y, -x) for n, (x, y) in pos.items()}
colors = [
    "orange"
    if d["name"] in ("scaled_dot_product_attention", "layer_norm")
    else "lightblue"
    if d["name"] == "conv2d"
    else "lightgrey"
    for _, d in sub.nodes(data=True)
]
plt.figure(figsize=(7, 18))
nx.draw(
    sub,
    pos,
    node_color=colors,
    node_size=220,
    labels={n: d["name"][:10] for n, d in sub.nodes(data=True)},
    font_size=6,
    arrowsize=6,
)
plt.title(f"MobileViT block {block}: conv (blue), LayerNorm/attention (orange)")
plt.savefig(OUT / "01_mobilevit_block.png", dpi=120, bbox_inches="tight")
to_dot(gm, OUT / "01_mobilevit_xxs.dot")
print("wrote", OUT / "01_mobilevit_block.png", "and", OUT / "01_mobilevit_xxs.dot")
