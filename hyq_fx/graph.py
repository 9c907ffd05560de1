"""Graph analysis of captured models: networkx/DOT export, norm classification, bridge finding.

PTQ of hybrid CNN-Transformer models goes wrong at a few structural places, and passes need to
find them on any model, not on a list of names:

* the *normalisations*, whose statistics and folding rules differ by kind (BatchNorm folds into
  the conv before it; LayerNorm over tokens does not; GroupNorm(1) normalises over C, H, W);
* the *bridges* where a conv feature map (N, C, H, W) is rearranged into tokens for attention,
  and where tokens are folded back into a feature map. The rearrangement (reshape / permute /
  flatten / unfold chains) moves values without changing them, but what is before and after it
  has very different ranges and quantization granularity, so quantizers are placed, shared or
  switched there.

Everything here reads only graph structure, shapes (``meta["val"]``, or ``meta["tensor_meta"]``
after :func:`propagate_shapes`) and the module paths that :func:`hyq_fx.capture` leaves in
``meta``. Module names are reported, never matched; the one type name read is timm's
``LayerNorm2d``, to label a norm (with a structural fallback: permute → layer_norm → permute).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .capture import MODULE_PATH, MODULE_TYPE
from .vocabulary import LAYOUT_OP_NAMES, arg

NORM_KIND = "hyq_norm_kind"

__all__ = [
    "NORM_KIND",
    "NORM_KINDS",
    "NormInfo",
    "Region",
    "Transition",
    "detect_norms",
    "find_regions",
    "find_transitions",
    "op_counts",
    "op_name",
    "propagate_shapes",
    "subgraph_for_module",
    "summarize",
    "tag_norms",
    "to_dot",
    "to_networkx",
    "transition_highlight",
]

# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def op_name(target: Any) -> str:
    """Short name of a call target: ``aten.conv2d.default`` → ``conv2d``, getitem → ``getitem``."""
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return str(target).split(".")[-1]
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", str(target))


def _target_str(node: fx.Node) -> str:
    """``aten.conv2d.default``, ``_operator.getitem``, or the attribute/module name."""
    target = node.target
    if isinstance(target, (str, torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    module = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    return f"{module}.{name}" if module and name else str(target)


def _meta_value(node: fx.Node) -> Any:
    """export's ``meta["val"]`` (FakeTensors), else ShapeProp's ``meta["tensor_meta"]`` (graphs
    loaded from an artifact have neither until :func:`propagate_shapes` runs)."""
    if "val" in node.meta:
        return node.meta["val"]
    return node.meta.get("tensor_meta")


def _tensor_like(val: Any) -> bool:
    # TensorMetadata is a NamedTuple: test it before the tuple case
    return isinstance(val, (torch.Tensor, TensorMetadata))


def _shape_of(val: Any) -> Any:
    """Shape of a meta value: tuple for a tensor, list of shapes for a tuple/list, else None."""
    if _tensor_like(val):
        return tuple(_int_or_str(s) for s in val.shape)
    if isinstance(val, (tuple, list)):
        shapes = [_shape_of(v) for v in val]
        return shapes if any(s is not None for s in shapes) else None
    return None


def _dtype_of(val: Any) -> Any:
    if _tensor_like(val):
        return str(val.dtype)
    if isinstance(val, (tuple, list)):
        dtypes = [_dtype_of(v) for v in val]
        return dtypes if any(d is not None for d in dtypes) else None
    return None


def _int_or_str(s: Any) -> int | str:
    """A static size as int; a symbolic one (dynamic batch: ``s77``, ``4*s77``) as its text.
    ``int()`` on a SymInt would specialise it to the example's value, which hides dynamism."""
    if isinstance(s, torch.SymInt):
        value = s.node.maybe_as_int()
        return int(value) if value is not None else str(s)
    try:
        return int(s)
    except (TypeError, ValueError):
        return str(s)


def _is_tensor_node(node: fx.Node) -> bool:
    """Does the node produce a tensor (or tensors)? Size arithmetic (``sym_size``, ``mul`` of
    SymInts under a dynamic batch) does not, and must not count as dataflow."""
    if node.op == "output":
        return False
    val = _meta_value(node)
    if val is None:
        kind = node.meta.get("type")  # ShapeProp records the result type even for non-tensors
        return kind is None or (isinstance(kind, type) and issubclass(kind, (torch.Tensor, tuple)))
    if isinstance(val, (tuple, list)) and not isinstance(val, TensorMetadata):
        return any(_tensor_like(v) for v in val)
    return _tensor_like(val)


def _shape(node: Any) -> tuple | None:
    """Shape of a node's tensor output (None for non-tensors, tuples, non-nodes)."""
    if not isinstance(node, fx.Node):
        return None
    val = _meta_value(node)
    return _shape_of(val) if _tensor_like(val) else None


def descendants(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node that (transitively) uses its output."""
    seen, stack = {node}, [node]
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


def propagate_shapes(gm: fx.GraphModule, *example_inputs: torch.Tensor) -> fx.GraphModule:
    """Run the graph once to record shapes (``meta["tensor_meta"]``) where ``meta["val"]`` is
    missing, e.g. on a graph loaded from an artifact; the analyses here need shapes."""
    ShapeProp(gm).propagate(*example_inputs)
    return gm


def _path(node: fx.Node) -> str:
    return node.meta.get(MODULE_PATH, "") or ""


def _mtype(node: fx.Node) -> str:
    return node.meta.get(MODULE_TYPE, "") or ""


def _attr_target(value: Any) -> str | None:
    """The parameter/buffer name behind a get_attr argument (None if absent or computed)."""
    if isinstance(value, fx.Node) and value.op == "get_attr":
        return str(value.target)
    return None


def _common_prefix(paths: Iterable[str]) -> str:
    """Longest common dotted prefix: ``stages.2.1.attn``, ``stages.2.1`` → ``stages.2.1``."""
    split = [p.split(".") if p else [] for p in paths]
    if not split:
        return ""
    prefix = split[0]
    for parts in split[1:]:
        n = 0
        while n < min(len(prefix), len(parts)) and prefix[n] == parts[n]:
            n += 1
        prefix = prefix[:n]
    return ".".join(prefix)


def _in_module(path: str, prefix: str) -> bool:
    return not prefix or path == prefix or path.startswith(prefix + ".")


# --------------------------------------------------------------------------------------------
# networkx / DOT
# --------------------------------------------------------------------------------------------


def to_networkx(gm: fx.GraphModule | fx.Graph) -> nx.DiGraph:
    """One DiGraph node per fx node (keyed by name), one edge per producer→consumer use.

    Attributes: ``op``, ``target`` (string), ``name`` (short op name), ``module_path``,
    ``module_type``, ``shape`` (tuple, list of tuples for multi-output nodes, or None; symbolic
    sizes as text such as ``"s77"``), ``dtype``, ``tensor`` (False for size arithmetic) and
    ``index`` (position in the fx graph, a topological order).
    """
    graph = gm.graph if isinstance(gm, fx.GraphModule) else gm
    g = nx.DiGraph()
    for i, node in enumerate(graph.nodes):
        val = _meta_value(node)
        g.add_node(
            node.name,
            op=node.op,
            target=_target_str(node),
            name=op_name(node.target) if node.op == "call_function" else node.op,
            module_path=_path(node),
            module_type=_mtype(node),
            shape=_shape_of(val),
            dtype=_dtype_of(val),
            tensor=_is_tensor_node(node),
            index=i,
        )
    for node in graph.nodes:
        for user in node.users:
            g.add_edge(node.name, user.name)
    return g


def subgraph_for_module(gm: fx.GraphModule | nx.DiGraph, prefix: str) -> nx.DiGraph:
    """The nodes whose module path is ``prefix`` or below it, plus the get_attr nodes that feed
    only them — for drawing one block instead of the whole model."""
    g = gm if isinstance(gm, nx.DiGraph) else to_networkx(gm)
    keep = {
        n
        for n, d in g.nodes(data=True)
        if d["op"] != "get_attr" and d["module_path"] and _in_module(d["module_path"], prefix)
    }
    for n, d in g.nodes(data=True):
        if d["op"] == "get_attr":
            users = set(g.successors(n))
            if users and users <= keep:
                keep.add(n)
    return g.subgraph(keep).copy()


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _fmt_shape(shape: Any) -> str:
    if shape is None:
        return ""
    if isinstance(shape, list):
        return "[" + ", ".join(_fmt_shape(s) for s in shape) + "]"
    return "(" + ",".join(str(s) for s in shape) + ")"


def to_dot(
    gm_or_digraph: fx.GraphModule | nx.DiGraph,
    path: str | Path,
    highlight: dict[str, str] | None = None,
    title: str | None = None,
    legend: dict[str, str] | None = None,
) -> Path:
    """Write a Graphviz DOT file (render with ``dot -Tsvg``); returns the path.

    get_attr nodes (weights, buffers) are collapsed into their consumers, whose label then gets
    a ``+N params`` note: drawn separately they double the node count and hide the dataflow.
    Size arithmetic (``sym_size`` and friends under a dynamic batch) is left out likewise.
    ``highlight`` maps node names to fill colours (any Graphviz colour, e.g. ``"orange"``);
    ``legend`` maps a caption to its colour, drawn as a boxed key beside the graph.
    """
    g = gm_or_digraph if isinstance(gm_or_digraph, nx.DiGraph) else to_networkx(gm_or_digraph)
    highlight = highlight or {}
    hidden = {
        n
        for n, d in g.nodes(data=True)
        if d.get("op") == "get_attr" or (d.get("op") != "output" and not d.get("tensor", True))
    }
    lines = [
        f"digraph {_dot_quote(title or 'hyq_fx')} {{",
        "  rankdir=TB;",
        '  node [shape=box, style="rounded", fontname="Helvetica", fontsize=10];',
    ]
    nodes = sorted(
        (n for n in g.nodes if n not in hidden), key=lambda n: g.nodes[n].get("index", 0)
    )
    for n in nodes:
        d = g.nodes[n]
        short = d.get("name") or d.get("op", "")
        label = f"{n}\n{short} {_fmt_shape(d.get('shape'))}".rstrip()
        params = sum(1 for p in g.predecessors(n) if g.nodes[p].get("op") == "get_attr")
        if params:
            label += f"\n+{params} params"
        if d.get("module_path"):
            label += f"\n{d['module_path']}"
        attrs = [f"label={_dot_quote(label)}"]
        if d.get("op") in ("placeholder", "output"):
            attrs.append("shape=ellipse")
        if n in highlight:
            attrs.append(f'style="rounded,filled", fillcolor={_dot_quote(highlight[n])}')
        lines.append(f"  {_dot_quote(n)} [{', '.join(attrs)}];")
    for u, v in g.edges:
        if u in hidden or v in hidden:
            continue
        lines.append(f"  {_dot_quote(u)} -> {_dot_quote(v)};")
    if legend:
        lines += ["  subgraph cluster_legend {", '    label="legend";']
        for i, (caption, color) in enumerate(legend.items()):
            lines.append(
                f'    "legend_{i}" [label={_dot_quote(caption)}, style="rounded,filled", '
                f"fillcolor={_dot_quote(color)}];"
            )
        lines.append("  }")
    lines.append("}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


# --------------------------------------------------------------------------------------------
# normalization layers
# --------------------------------------------------------------------------------------------

NORM_KINDS = (
    "batchnorm",
    "layernorm_tokens",
    "layernorm_nhwc",
    "layernorm2d",
    "groupnorm1",
    "groupnorm",
    "other",
)

_BN = {
    "batch_norm",
    "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit",
    "native_batch_norm",
    "cudnn_batch_norm",
    "miopen_batch_norm",
}
_LN = {"layer_norm", "native_layer_norm"}
_GN = {"group_norm", "native_group_norm"}
_OTHER_NORM = {"rms_norm", "instance_norm", "_fused_rms_norm"}


@dataclass
class NormInfo:
    """One normalization node and what a quantization pass needs to know about it.

    ``kind`` decides the treatment: ``batchnorm`` folds into a preceding conv;
    ``layernorm_tokens`` / ``layernorm_nhwc`` / ``layernorm2d`` normalise per position over
    channels (cannot be folded, their outputs are good per-tensor quantization points);
    ``groupnorm1`` normalises over C, H, W jointly (MobileViT v2's LayerNorm);
    ``other`` is anything else (RMSNorm, InstanceNorm, LayerNorm over several dims).
    """

    node: str
    module_path: str
    module_type: str
    kind: str
    channels: int | None
    weight: str | None = None
    bias: str | None = None
    running_mean: str | None = None
    running_var: str | None = None
    num_groups: int | None = None
    normalized_shape: list[int] | None = None
    input_shape: tuple | None = None


def _perm_dims(node: Any) -> list[int] | None:
    """Dims of a permute node (normalised to non-negative), else None."""
    if not (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and op_name(node.target) == "permute"
    ):
        return None
    shape = _shape(node)
    dims = arg(node, 1, "dims")
    if shape is None or not isinstance(dims, (list, tuple)):
        return None
    return [int(d) % len(shape) for d in dims]


_TO_NHWC = [0, 2, 3, 1]
_TO_NCHW = [0, 3, 1, 2]


def _ln2d_pattern(ln: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``permute(0,2,3,1) → layer_norm → permute(0,3,1,2)`` (timm LayerNorm2d): the permutes."""
    src = ln.args[0] if ln.args else None
    if _perm_dims(src) != _TO_NHWC or len(ln.users) != 1:
        return None
    (dst,) = ln.users
    if _perm_dims(dst) != _TO_NCHW:
        return None
    return src, dst


def _reaches_nchw_permute(node: fx.Node, depth: int = 8) -> bool:
    """Does ``node``'s output reach a ``permute(0,3,1,2)`` through per-position ops only?"""
    frontier = [node]
    seen = {node}
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen or u.op != "call_function":
                    continue
                seen.add(u)
                if _perm_dims(u) == _TO_NCHW:
                    return True
                if _is_layout(u) or _is_attention(u):
                    continue
                nxt.append(u)
        frontier = nxt
    return False


def _classify_norm(node: fx.Node) -> NormInfo | None:
    if node.op != "call_function":
        return None
    name = op_name(node.target)
    inp = node.args[0] if node.args else None
    in_shape = _shape(inp)
    info = NormInfo(
        node=node.name,
        module_path=_path(node),
        module_type=_mtype(node),
        kind="other",
        channels=None,
        input_shape=in_shape,
    )
    if name in _BN:
        info.kind = "batchnorm"
        info.channels = in_shape[1] if in_shape and len(in_shape) > 1 else None
        info.weight = _attr_target(arg(node, 1, "weight"))
        info.bias = _attr_target(arg(node, 2, "bias"))
        info.running_mean = _attr_target(arg(node, 3, "running_mean"))
        info.running_var = _attr_target(arg(node, 4, "running_var"))
        return info
    if name in _GN:
        groups = arg(node, 1, "num_groups") if name == "group_norm" else arg(node, 6, "group")
        info.num_groups = int(groups) if isinstance(groups, int) else None
        info.kind = "groupnorm1" if info.num_groups == 1 else "groupnorm"
        info.channels = in_shape[1] if in_shape and len(in_shape) > 1 else None
        info.weight = _attr_target(arg(node, 2 if name == "group_norm" else 1, "weight"))
        info.bias = _attr_target(arg(node, 3 if name == "group_norm" else 2, "bias"))
        return info
    if name in _LN:
        ns = arg(node, 1, "normalized_shape")
        ns = [int(s) for s in ns] if isinstance(ns, (list, tuple)) else None
        info.normalized_shape = ns
        info.weight = _attr_target(arg(node, 2, "weight"))
        info.bias = _attr_target(arg(node, 3, "bias"))
        info.channels = ns[-1] if ns else None
        rank = len(in_shape) if in_shape else 0
        if "LayerNorm2d" in info.module_type or _ln2d_pattern(node) is not None:
            info.kind = "layernorm2d"
        elif ns is None or len(ns) != 1:
            info.kind = "other"
        elif rank == 4 and (_perm_dims(inp) == _TO_NHWC or _reaches_nchw_permute(node)):
            info.kind = "layernorm_nhwc"
        else:
            # (B, N, C), (B*P, N, C) or 4D (B, P, N, C) tokens: normalised over the last dim
            info.kind = "layernorm_tokens"
        return info
    if name in _OTHER_NORM:
        info.channels = in_shape[1] if in_shape and len(in_shape) > 1 else None
        return info
    return None


def detect_norms(gm: fx.GraphModule) -> list[NormInfo]:
    """Classify every normalization node of a captured graph, in graph order."""
    return [info for node in gm.graph.nodes if (info := _classify_norm(node)) is not None]


def tag_norms(gm: fx.GraphModule) -> list[NormInfo]:
    """:func:`detect_norms`, and write each kind to ``node.meta["hyq_norm_kind"]``."""
    infos = detect_norms(gm)
    by_name = {info.node: info.kind for info in infos}
    for node in gm.graph.nodes:
        if node.name in by_name:
            node.meta[NORM_KIND] = by_name[node.name]
    return infos


# --------------------------------------------------------------------------------------------
# conv ↔ transformer transitions
# --------------------------------------------------------------------------------------------

# spatial ops: their output is certainly an (N, C, H, W) feature map
_POOL = {
    "avg_pool2d",
    "max_pool2d",
    "max_pool2d_with_indices",
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "_adaptive_avg_pool2d",
    "lp_pool2d",
}
_UPSAMPLE_PREFIX = ("upsample_", "_upsample_")
_CONV = {"conv2d", "convolution", "_convolution", "conv_transpose2d"}
_ATTN_SDPA_PREFIX = ("scaled_dot_product_attention", "_scaled_dot_product")
_SOFTMAX = {"softmax", "_softmax", "_safe_softmax", "log_softmax", "_log_softmax"}
_MATMUL = {"matmul", "bmm", "einsum", "baddbmm"}


def _is_layout(node: fx.Node) -> bool:
    return node.op == "call_function" and op_name(node.target) in LAYOUT_OP_NAMES


def _is_attention(node: fx.Node, act: set[fx.Node] | None = None) -> bool:
    """sdpa, softmax, or a matmul of two activations (not activation × weight)."""
    if node.op != "call_function":
        return False
    name = op_name(node.target)
    if name.startswith(_ATTN_SDPA_PREFIX) or name in _SOFTMAX:
        return True
    if name in _MATMUL:
        operands = [a for a in node.all_input_nodes if a.op != "get_attr" and _is_tensor_node(a)]
        if act is not None:
            operands = [a for a in operands if a in act]
        return len(operands) >= 2
    return False


def _is_spatial_anchor(node: fx.Node) -> bool:
    """Ops that only make sense on an (N, C, H, W) map: k>1 or grouped convs, BN, pooling,
    resampling. 1x1 convs are left out: MobileViT v2 runs its "linear" layers as 1x1 convs on
    unfolded tokens."""
    if node.op != "call_function":
        return False
    name = op_name(node.target)
    in_shape = _shape(node.args[0]) if node.args else None
    if in_shape is None or len(in_shape) != 4:
        return False
    if name in _CONV:
        w_shape = _shape(arg(node, 1, "weight"))
        groups = arg(node, 6, "groups", 1) if name == "conv2d" else arg(node, 8, "groups", 1)
        kernel_gt1 = w_shape is not None and any(k != 1 for k in w_shape[2:])
        return kernel_gt1 or (isinstance(groups, int) and groups > 1)
    return name in _BN or name in _POOL or name.startswith(_UPSAMPLE_PREFIX)


@dataclass
class Transition:
    """One crossing between the conv side and an attention region.

    ``entry`` is the last node on the side being left (its output is the crossing tensor),
    ``nodes`` the bridge (layout-only ops: reshape/permute/transpose/flatten/unfold…), and
    ``exit`` the last bridge node, whose output the other side consumes (``consumers``). With
    no bridge (a token op reading a map directly) ``nodes`` is empty and ``exit == entry``.
    """

    kind: str  # "conv->transformer" | "transformer->conv"
    block: str
    entry: str
    exit: str
    nodes: list[str]
    consumers: list[str]
    in_shape: tuple | None
    out_shape: tuple | None
    region: int


@dataclass
class Region:
    """A connected set of token-side nodes containing attention, with its crossings."""

    index: int
    block: str
    nodes: list[str]
    attention: list[str]
    transitions: list[Transition] = field(default_factory=list)

    @property
    def entries(self) -> list[Transition]:
        return [t for t in self.transitions if t.kind == "conv->transformer"]

    @property
    def exits(self) -> list[Transition]:
        return [t for t in self.transitions if t.kind == "transformer->conv"]


def _classify_sides(graph: fx.Graph) -> tuple[set[fx.Node], set[fx.Node], set[fx.Node]]:
    """Split activation nodes into conv side and token side. Returns (act, conv, token).

    Conv side: spatial anchors, plus everything reaching them or reached from them through
    non-layout ops (1x1 convs, activations, residual adds, SE branches…), plus 4D inputs.
    Layout ops stop the spread: after a reshape/permute a tensor is no longer an image.
    Attention ops always stay token side. Nodes computed from constants only (position
    embeddings, attention-bias tables) are neither.
    """
    nodes = list(graph.nodes)
    act: set[fx.Node] = set()
    for n in nodes:
        if not _is_tensor_node(n):
            continue
        if n.op == "placeholder" or (
            n.op in ("call_function", "call_module", "call_method")
            and any(i in act for i in n.all_input_nodes)
        ):
            act.add(n)
    transparent: set[fx.Node] = set()
    for n in nodes:
        if n in act and _is_layout(n):
            ins = [i for i in n.all_input_nodes if i in act]
            if len(ins) == 1 and _shape(ins[0]) is not None and _shape(ins[0]) == _shape(n):
                transparent.add(n)  # identity permute, same-shape reshape: no layout change
        if n.op == "call_function" and op_name(n.target) in _LN and (p := _ln2d_pattern(n)):
            transparent.update(p)  # LayerNorm2d: the permutes are internal to a 2D norm
    barrier = {n for n in act if _is_attention(n, act)}

    def spreads(n: fx.Node) -> bool:
        return n not in barrier and (not _is_layout(n) or n in transparent)

    conv: set[fx.Node] = set()
    for n in nodes:  # forward: from maps
        if n not in act or n in barrier:
            continue
        if n.op == "placeholder":
            shape = _shape(n)
            if shape is not None and len(shape) == 4:
                conv.add(n)
        elif _is_spatial_anchor(n) or (spreads(n) and any(i in conv for i in n.all_input_nodes)):
            conv.add(n)
    to_map: set[fx.Node] = {n for n in conv if _is_spatial_anchor(n)}
    for n in reversed(nodes):  # backward: into maps (e.g. the 1x1 conv before a BN)
        if n in act and n.op != "placeholder" and spreads(n) and any(u in to_map for u in n.users):
            to_map.add(n)
    conv |= to_map
    token = {n for n in act if n not in conv and n.op not in ("placeholder", "output")}
    return act, conv, token


def _act_inputs(n: fx.Node, act: set[fx.Node]) -> list[fx.Node]:
    return [i for i in n.all_input_nodes if i in act]


def find_regions(gm: fx.GraphModule) -> list[Region]:
    """Attention regions and their conv↔transformer crossings, from graph structure only.

    A region is a connected component of token-side nodes (see :func:`_classify_sides`) that
    contains an attention op (sdpa, softmax, activation×activation matmul). Its crossings are
    the edges between it and the conv side; each is walked along its layout-only bridge.
    """
    graph = gm.graph
    act, conv, token = _classify_sides(graph)
    order = {n: i for i, n in enumerate(graph.nodes)}
    position = {n.name: i for n, i in order.items()}
    seen: set[fx.Node] = set()
    regions: list[Region] = []
    for start in graph.nodes:
        if start not in token or start in seen or not _is_attention(start, act):
            continue
        comp: set[fx.Node] = set()
        queue = deque([start])
        seen.add(start)
        while queue:
            n = queue.popleft()
            comp.add(n)
            for m in list(n.all_input_nodes) + list(n.users):
                if m in token and m not in seen:
                    seen.add(m)
                    queue.append(m)
        comp_sorted = sorted(comp, key=order.__getitem__)
        attention = [n for n in comp_sorted if _is_attention(n, act)]
        region = Region(
            index=len(regions),
            block="",
            nodes=[n.name for n in comp_sorted],
            attention=[n.name for n in attention],
        )
        transitions: list[Transition] = []
        # conv -> transformer: a conv-side producer feeding the region
        for v in comp_sorted:
            for u in _act_inputs(v, act):
                if u not in conv:
                    continue
                chain: list[fx.Node] = [v] if _is_layout(v) else []
                cur = v
                while chain and len(cur.users) == 1:
                    (nxt,) = cur.users
                    if nxt in comp and _is_layout(nxt) and _act_inputs(nxt, act) == [cur]:
                        chain.append(nxt)
                        cur = nxt
                    else:
                        break
                exit_ = chain[-1] if chain else u
                consumers = [w for w in exit_.users if w in comp] if chain else [v]
                transitions.append(
                    Transition(
                        kind="conv->transformer",
                        block="",
                        entry=u.name,
                        exit=exit_.name,
                        nodes=[c.name for c in chain],
                        consumers=[c.name for c in consumers],
                        in_shape=_shape(u),
                        out_shape=_shape(exit_),
                        region=region.index,
                    )
                )
        # transformer -> conv: a region node whose output the conv side consumes
        for u in comp_sorted:
            users = [w for w in u.users if w in conv]
            if not users:
                continue
            chain = [u] if _is_layout(u) else []
            cur = u
            while chain:
                ins = _act_inputs(cur, act)
                if (
                    len(ins) == 1
                    and ins[0] in comp
                    and _is_layout(ins[0])
                    and len(ins[0].users) == 1
                ):
                    chain.insert(0, ins[0])
                    cur = ins[0]
                else:
                    break
            if chain:
                ins = _act_inputs(chain[0], act)
                entry = ins[0] if len(ins) == 1 else chain[0]
            else:
                entry = u
            transitions.append(
                Transition(
                    kind="transformer->conv",
                    block="",
                    entry=entry.name,
                    exit=u.name,
                    nodes=[c.name for c in chain],
                    consumers=[w.name for w in users],
                    in_shape=_shape(entry),
                    out_shape=_shape(u),
                    region=region.index,
                )
            )
        # the block: where the bridges and the attention live (not the classifier head that a
        # never-returning region, e.g. EfficientFormer's last stage, also contains)
        by_name = {n.name: n for n in comp}
        core = set(attention)
        for t in transitions:
            core.update(by_name[x] for x in t.nodes)
        region.block = _common_prefix(_path(n) for n in core)
        for t in transitions:
            t.block = region.block
        region.transitions = sorted(transitions, key=lambda t: (position[t.exit], t.kind))
        regions.append(region)
    return regions


def find_transitions(gm: fx.GraphModule) -> list[Transition]:
    """All conv→transformer and transformer→conv crossings, in graph order of their exit."""
    out = [t for r in find_regions(gm) for t in r.transitions]
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(out, key=lambda t: (order[t.exit], t.kind))


def transition_highlight(
    transitions: Iterable[Transition],
    colors: tuple[str, str] = ("orange", "lightblue"),
) -> dict[str, str]:
    """A :func:`to_dot` highlight map: conv→transformer bridges in ``colors[0]``, returns in
    ``colors[1]`` (entry and exit nodes included)."""
    out: dict[str, str] = {}
    for t in transitions:
        color = colors[0] if t.kind == "conv->transformer" else colors[1]
        for name in [t.entry, *t.nodes, t.exit]:
            out[name] = color
    return out


# --------------------------------------------------------------------------------------------
# counts and summary
# --------------------------------------------------------------------------------------------


def op_counts(gm: fx.GraphModule) -> dict[str, int]:
    """How often each call_function target occurs (short names), most frequent first."""
    counts = Counter(op_name(n.target) for n in gm.graph.nodes if n.op == "call_function")
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def summarize(gm: fx.GraphModule) -> dict[str, Any]:
    """JSON-able overview for ``hyq-fx inspect``: op counts, norms by kind, attention regions
    and their transitions."""
    norms = detect_norms(gm)
    by_kind: dict[str, list[str]] = {}
    for info in norms:
        by_kind.setdefault(info.kind, []).append(info.module_path or info.node)
    regions = find_regions(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return _jsonable(
        {
            "nodes": len(gm.graph.nodes),
            "inputs": [_shape(n) for n in placeholders],
            "parameters": sum(1 for n in gm.graph.nodes if n.op == "get_attr"),
            "op_counts": op_counts(gm),
            "norms": {
                kind: {"count": len(paths), "module_paths": paths}
                for kind, paths in by_kind.items()
            },
            "regions": [
                {
                    "block": r.block,
                    "nodes": len(r.nodes),
                    "attention": r.attention,
                    "entries": [t.exit for t in r.entries],
                    "exits": [t.exit for t in r.exits],
                }
                for r in regions
            ],
            "transitions": [asdict(t) for r in regions for t in r.transitions],
        }
    )
