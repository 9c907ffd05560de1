"""Rewrite the few ATen ops that exporters lack into plain ones, on a copy of the graph.

The captured graph keeps some ops whole because graph analyses read them better that way
(``aten.channel_shuffle`` is one same-shape layout op; a reshape/transpose/reshape chain would
look like a map → token crossing). Backends (ONNX, TVM Relax) translate a smaller op set, so
before exporting, these are rewritten exactly::

    channel_shuffle(x, g)  =  reshape(transpose(reshape(x, [N, g, C/g, H, W]), 1, 2), [N, C, H, W])
    relu6(x)               =  hardtanh(x, 0, 6)
    to.device(x, d, t)     =  to.dtype(x, t)     (an exported graph runs on one device; TVM 0.27's
                                                  importer has no to.device: EdgeNeXt's encoding)

:func:`fold_tokens_with_pixel_shuffle` goes the other way for one chain that ONNX Runtime runs
slowly: MobileViT's fold of tokens ``[B, P, N, C]`` (``P = s²`` pixels of a patch, ``N = h·w``
patches) back into a feature map, which timm writes as two transposes, the second over
``[B·C·h, w, s, s]``::

    reshape(transpose(reshape(transpose(x, 1, 3), [B·C·h, w, s, s]), 1, 2), [B, C, h·s, w·s])
        =  pixel_shuffle(reshape(permute(x, [0, 3, 1, 2]), [B, C·s², h, w]), s)

because ``out[b, c, i·s + u, j·s + v] = x[b, u·s + v, i·w + j, c]`` on both sides. The exporter
writes ``pixel_shuffle`` as one ``DepthToSpace`` (CRD). ONNX Runtime 1.32 moves the input
quantizer of the next conv in front of such moves, and its uint8 Transpose over runs of
``s = 2`` bytes took 16 ms of a 100 ms batch-32 mobilevit_xxs run for one fold
(float: 0.2 ms); ``DepthToSpace`` does the three folds in 2.7 ms.

MobileViTv2 folds its tokens ``[B, C, P, N]`` with one 6-D permute instead::

    reshape(permute(reshape(x, [B, C, s, s, h, w]), [0, 1, 4, 2, 5, 3]), [B, C, h·s, w·s])
        =  pixel_shuffle(reshape(x, [B, C·s², h, w]), s)

(``out[b, c, i·s + u, j·s + v] = x[b, c, u, v, i, j]``). There the next conv's quantizer moves
in front of the permute as well, and ONNX Runtime's uint8 Transpose of
``[B, 64, 8, 2, 8, 2]`` (inner dimension 2) took 2–4 ms of mobilevitv2_050's batch-32 run.

:func:`unfold_maps_with_pixel_unshuffle` rewrites the opposite chains, the unfold of a feature
map ``[B, C, H, W]`` into tokens, the same way::

    MobileViT:   reshape(transpose(reshape(transpose(reshape(x, [B·C·h, s, w, s]), 1, 2),
                         [B, C, N, P]), 1, 3), [B·P, N, C])
                   =  reshape(permute(reshape(pixel_unshuffle(x, s), [B, C, P, N]),
                                      [0, 2, 3, 1]), [B·P, N, C])
    MobileViTv2: reshape(permute(reshape(x, [B, C, h, s, w, s]), [0, 1, 3, 5, 2, 4]), [B, C, P, N])
                   =  reshape(pixel_unshuffle(x, s), [B, C, P, N])

and the ONNX exporter writes ``pixel_unshuffle`` as ``SpaceToDepth`` plus a transpose of whole
``h·w`` planes: in ONNX Runtime 1.32 at batch 32, 0.4–0.6 ms where the transposes over runs of
``s = 2`` floats took 2.2–2.4 ms (``[32, 64, 16, 16]``, both forms).

:func:`batch_norm_as_affine` writes an inference-mode ``batch_norm`` as the per-channel affine
map it is, for TVM: TVM 0.27's ``from_exported_program`` (without PyTorch's decompositions,
which the integer rewrite needs) translates ``aten.batch_norm`` as if it normalised with the
batch's statistics (a BatchNorm2d in eval mode came out 3.1 off in max |Δ|, LeViT's logits at
−44 dB SQNR)::

    batch_norm(x, w, b, μ, σ², eps)  =  x · a + c,   a = w / √(σ² + eps),   c = b − μ · a

with ``a``, ``c`` computed once in float64 and stored as float32 ``[C, 1, …]`` constants.

Invariant checked by the tests: the rewritten graph computes the same outputs, bit for bit
(``batch_norm_as_affine``: to float rounding, 1e-5).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from .patterns import is_op, match_all, wildcard

aten = torch.ops.aten
_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


def _shape(node: fx.Node) -> list[int] | None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return list(val.shape)
    meta = node.meta.get("tensor_meta")
    return list(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _set_val(node: fx.Node) -> None:
    """``meta["val"]`` of a new node, computed from its inputs' (fake) values."""
    args = fx.node.map_arg(node.args, lambda a: a.meta.get("val"))
    vals = [a for a in fx.node.map_aggregate(args, lambda v: v) if isinstance(a, torch.Tensor)]
    if any(a is None for a in fx.node.map_aggregate(node.all_input_nodes, lambda v: v)):
        return
    mode = getattr(vals[0], "fake_mode", None) if vals else None
    with mode if mode is not None else contextlib.nullcontext():
        node.meta["val"] = node.target(*args)


def lower_for_export(
    gm: fx.GraphModule, example_input: torch.Tensor | None = None
) -> fx.GraphModule:
    """A copy of ``gm`` with channel_shuffle, relu6 and to.device written as ops every backend has.

    A graph without shapes (loaded from an artifact) needs ``example_input`` to find them.
    """
    targets = (aten.channel_shuffle.default, aten.relu6.default, aten.to.device)
    if not any(n.op == "call_function" and n.target in targets for n in gm.graph.nodes):
        return gm
    gm = copy.deepcopy(gm)
    graph = gm.graph
    shuffles = [n for n in graph.nodes if n.target is aten.channel_shuffle.default]
    if example_input is not None and any(_shape(n.args[0]) is None for n in shuffles):
        from .graph import propagate_shapes

        with torch.no_grad():
            propagate_shapes(gm, example_input)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in targets:
            continue
        x = node.args[0]
        with graph.inserting_before(node):
            if node.target is aten.relu6.default:
                new = graph.call_function(aten.hardtanh.default, (x, 0.0, 6.0))
            elif node.target is aten.to.device:  # exported graphs run on one device
                dtype = node.args[2] if len(node.args) > 2 else node.kwargs.get("dtype")
                new = graph.call_function(aten.to.dtype, (x, dtype))
            else:
                shape = _shape(x)
                if shape is None or len(shape) != 4:
                    raise ValueError(
                        f"channel_shuffle node {node.name}: needs a 4-D input with a known "
                        "shape (node.meta['val']) to be rewritten for export"
                    )
                g = int(node.args[1])
                _, c, h, w = (int(d) if i else d for i, d in enumerate(shape))
                split = graph.call_function(aten.reshape.default, (x, [-1, g, c // g, h, w]))
                swap = graph.call_function(aten.transpose.int, (split, 1, 2))
                new = graph.call_function(aten.reshape.default, (swap, [-1, c, h, w]))
                for part in (split, swap):
                    part.meta.update({k: v for k, v in node.meta.items() if k != "val"})
                    _set_val(part)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm


def _transpose(x, name: str):
    return is_op(aten.transpose.int)(x, wildcard(), wildcard()).only_used_once().named(name)


# MobileViT's fold as timm writes it (see the module docstring): [B, P, N, C] -> [B, C, H, W]
_FOLD = is_op(*_RESHAPES)(
    _transpose(
        is_op(*_RESHAPES)(_transpose(wildcard().named("tokens"), "swap_tokens"), wildcard())
        .only_used_once()
        .named("rows"),
        "swap_rows",
    ),
    wildcard(),
).named("image")


def _reshape_permute_reshape(source: str, result: str):
    """``reshape(permute(reshape(source, 6-D), perm), ...)``, the middle nodes used once."""
    split = is_op(*_RESHAPES)(wildcard().named(source), wildcard()).only_used_once()
    perm = is_op(aten.permute.default)(split.named("split"), wildcard()).only_used_once()
    return is_op(*_RESHAPES)(perm.named("perm"), wildcard()).named(result)


# MobileViTv2's fold: [B, C, P, N] -> [B, C, s, s, h, w] -> permute -> [B, C, H, W]
_FOLD_6D = _reshape_permute_reshape("tokens", "image")
_FOLD_6D_PERM = [0, 1, 4, 2, 5, 3]


# MobileViT's unfold: [B, C, H, W] -> [B·C·h, s, w, s] -> [B, C, N, P] -> [B·P, N, C]
_UNFOLD = is_op(*_RESHAPES)(
    _transpose(
        is_op(*_RESHAPES)(
            _transpose(
                is_op(*_RESHAPES)(wildcard().named("image"), wildcard())
                .only_used_once()
                .named("rows"),
                "swap_rows",
            ),
            wildcard(),
        )
        .only_used_once()
        .named("grid"),
        "swap_tokens",
    ),
    wildcard(),
).named("tokens")
# MobileViTv2's unfold: [B, C, H, W] -> [B, C, h, s, w, s] -> permute -> [B, C, P, N]
_UNFOLD_6D = _reshape_permute_reshape("image", "tokens")
_UNFOLD_6D_PERM = [0, 1, 3, 5, 2, 4]


def _dims(node: fx.Node, rank: int) -> tuple[int, ...]:
    """The transposed dims of ``node`` (sorted, non-negative) for an input of ``rank``."""
    return tuple(sorted(int(d) % rank for d in node.args[1:3]))


def _fold_factor(m: dict[str, fx.Node]) -> int | None:
    """``s`` if the match is a fold of ``s×s`` patches (shapes checked), else ``None``."""
    shapes = [_shape(m[k]) for k in ("tokens", "rows", "image")]
    if any(s is None or len(s) != 4 for s in shapes):
        return None
    (_, p, n, c), (_, w, s, s2), (_, c_out, height, width) = shapes
    if _dims(m["swap_tokens"], 4) != (1, 3) or _dims(m["swap_rows"], 4) != (1, 2):
        return None
    ok = (
        s == s2
        and p == s * s
        and c_out == c
        and height % s == 0
        and width == w * s
        and n == (height // s) * w
    )
    return int(s) if ok else None


def _fold_6d_factor(m: dict[str, fx.Node]) -> int | None:
    """``s`` if the match is MobileViTv2's fold of ``s×s`` patches (shapes checked)."""
    split, image = _shape(m["split"]), _shape(m["image"])
    if split is None or image is None or len(split) != 6 or len(image) != 4:
        return None
    if [int(d) % 6 for d in m["perm"].args[1]] != _FOLD_6D_PERM:
        return None
    _, c, s, s2, h, w = split
    ok = s == s2 and image[1:] == [c, h * s, w * s]
    return int(s) if ok else None


def _rewrite(
    gm: fx.GraphModule,
    example_input: torch.Tensor | None,
    rewrites: tuple[tuple[Any, Callable[[fx.Graph, dict[str, fx.Node]], bool]], ...],
) -> fx.GraphModule:
    """A copy of ``gm`` with ``rewrite(graph, match)`` applied to every match of each pattern
    (``gm`` itself if nothing matches); a graph without shapes (e.g. one loaded from an
    artifact) gets them from ``example_input`` first."""
    if not any(True for pattern, _ in rewrites for _ in match_all(gm, pattern)):
        return gm
    gm = copy.deepcopy(gm)
    shapeless = any(
        _shape(n) is None
        for pattern, _ in rewrites
        for m in match_all(gm, pattern)
        for n in m.values()
    )
    if example_input is not None and shapeless:
        from .graph import propagate_shapes

        with torch.no_grad():
            propagate_shapes(gm, example_input)
    changed = False
    for pattern, rewrite in rewrites:
        for m in list(match_all(gm, pattern)):
            changed |= rewrite(gm.graph, m)
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def _replace(graph: fx.Graph, old: fx.Node, new: fx.Node, made: tuple[fx.Node, ...], dead) -> None:
    """``old``'s uses go to ``new`` (which takes its meta; the other ``made`` nodes take it
    without the shape), and the matched ``dead`` nodes are erased, users first."""
    shapeless = {k: v for k, v in old.meta.items() if k not in ("val", "tensor_meta")}
    for node in made:
        node.meta.update(shapeless)
    new.meta.update(old.meta)
    old.replace_all_uses_with(new)
    for node in dead:
        graph.erase_node(node)


def _fold_to_pixel_shuffle(graph: fx.Graph, m: dict[str, fx.Node]) -> bool:
    """MobileViT's fold as ``pixel_shuffle(reshape(permute(x, [0, 3, 1, 2]), ...), s)``."""
    s = _fold_factor(m)
    if s is None:
        return False
    _, p, _, c = _shape(m["tokens"])
    _, _, height, width = _shape(m["image"])
    with graph.inserting_before(m["image"]):
        channels_first = graph.call_function(aten.permute.default, (m["tokens"], [0, 3, 1, 2]))
        depth = graph.call_function(
            aten.reshape.default, (channels_first, [-1, int(c * p), height // s, width // s])
        )
        new = graph.call_function(aten.pixel_shuffle.default, (depth, s))
    dead = (m["image"], m["swap_rows"], m["rows"], m["swap_tokens"])
    _replace(graph, m["image"], new, (channels_first, depth), dead)
    return True


def _fold_6d_to_pixel_shuffle(graph: fx.Graph, m: dict[str, fx.Node]) -> bool:
    """MobileViTv2's fold as ``pixel_shuffle(reshape(x, [B, C·s², h, w]), s)``."""
    s = _fold_6d_factor(m)
    if s is None:
        return False
    _, c, _, _, h, w = _shape(m["split"])
    with graph.inserting_before(m["image"]):
        depth = graph.call_function(aten.reshape.default, (m["tokens"], [-1, c * s * s, h, w]))
        new = graph.call_function(aten.pixel_shuffle.default, (depth, s))
    _replace(graph, m["image"], new, (depth,), (m["image"], m["perm"], m["split"]))
    return True


def fold_tokens_with_pixel_shuffle(
    gm: fx.GraphModule, example_input: torch.Tensor | None = None
) -> fx.GraphModule:
    """A copy of ``gm`` with every token fold (MobileViT's and MobileViTv2's) written as
    ``pixel_shuffle`` (``gm`` itself if there is none); see the module docstring. A graph
    without shapes needs ``example_input``."""
    rewrites = ((_FOLD, _fold_to_pixel_shuffle), (_FOLD_6D, _fold_6d_to_pixel_shuffle))
    return _rewrite(gm, example_input, rewrites)


def _unfold_factor(m: dict[str, fx.Node]) -> int | None:
    """``s`` if the match is MobileViT's unfold into ``s×s`` patches (shapes checked)."""
    shapes = [_shape(m[k]) for k in ("image", "rows", "grid", "tokens")]
    if any(sh is None for sh in shapes) or [len(sh) for sh in shapes] != [4, 4, 4, 3]:
        return None
    (_, c, height, width), (_, s, w, s2), (_, c2, n, p), (_, n2, c3) = shapes
    if _dims(m["swap_rows"], 4) != (1, 2) or _dims(m["swap_tokens"], 4) != (1, 3):
        return None
    ok = (
        s == s2
        and height % s == 0
        and width == w * s
        and c == c2 == c3
        and p == s * s
        and n == n2 == (height // s) * w
    )
    return int(s) if ok else None


def _unfold_6d_factor(m: dict[str, fx.Node]) -> int | None:
    """``s`` if the match is MobileViTv2's unfold into ``s×s`` patches (shapes checked)."""
    image, split, tokens = (_shape(m[k]) for k in ("image", "split", "tokens"))
    if image is None or split is None or tokens is None or len(split) != 6:
        return None
    if len(image) != 4 or [int(d) % 6 for d in m["perm"].args[1]] != _UNFOLD_6D_PERM:
        return None
    _, c, h, s, w, s2 = split
    ok = s == s2 and image[1:] == [c, h * s, w * s] and tokens[1:] == [c, s * s, h * w]
    return int(s) if ok else None


def _unfold_to_pixel_unshuffle(graph: fx.Graph, m: dict[str, fx.Node]) -> bool:
    """MobileViT's unfold as ``reshape(permute(reshape(pixel_unshuffle(x, s), [B, C, P, N]),
    [0, 2, 3, 1]), [B·P, N, C])``."""
    s = _unfold_factor(m)
    if s is None:
        return False
    _, c, height, width = _shape(m["image"])
    p, n = s * s, (height // s) * (width // s)
    with graph.inserting_before(m["tokens"]):
        unshuffled = graph.call_function(aten.pixel_unshuffle.default, (m["image"], s))
        grid = graph.call_function(aten.reshape.default, (unshuffled, [-1, c, p, n]))
        last = graph.call_function(aten.permute.default, (grid, [0, 2, 3, 1]))
        new = graph.call_function(aten.reshape.default, (last, [-1, n, c]))
    dead = (m["tokens"], m["swap_tokens"], m["grid"], m["swap_rows"], m["rows"])
    _replace(graph, m["tokens"], new, (unshuffled, grid, last), dead)
    return True


def _unfold_6d_to_pixel_unshuffle(graph: fx.Graph, m: dict[str, fx.Node]) -> bool:
    """MobileViTv2's unfold as ``reshape(pixel_unshuffle(x, s), [B, C, P, N])``."""
    s = _unfold_6d_factor(m)
    if s is None:
        return False
    _, c, height, width = _shape(m["image"])
    with graph.inserting_before(m["tokens"]):
        unshuffled = graph.call_function(aten.pixel_unshuffle.default, (m["image"], s))
        new = graph.call_function(
            aten.reshape.default, (unshuffled, [-1, c, s * s, (height // s) * (width // s)])
        )
    _replace(graph, m["tokens"], new, (unshuffled,), (m["tokens"], m["perm"], m["split"]))
    return True


def unfold_maps_with_pixel_unshuffle(
    gm: fx.GraphModule, example_input: torch.Tensor | None = None
) -> fx.GraphModule:
    """A copy of ``gm`` with every unfold of a feature map into tokens (MobileViT's and
    MobileViTv2's) written with ``pixel_unshuffle`` (``gm`` itself if there is none); see the
    module docstring. A graph without shapes needs ``example_input``."""
    rewrites = ((_UNFOLD, _unfold_to_pixel_unshuffle), (_UNFOLD_6D, _unfold_6d_to_pixel_unshuffle))
    return _rewrite(gm, example_input, rewrites)


def _attr_tensor(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    if node is None:
        return None
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        raise _NotConstant
    obj: Any = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj.detach().double()


class _NotConstant(Exception):
    """A batch_norm parameter that is computed in the graph, not a stored tensor."""


def _affine_of(gm: fx.GraphModule, node: fx.Node) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(a, c)`` of an inference-mode batch_norm node, or None where it is not one."""
    args = list(node.args) + [None] * (9 - len(node.args))
    _, w, b, mean, var, training, _, eps, _ = args
    if training or mean is None or var is None:
        return None
    try:
        w, b, mean, var = (_attr_tensor(gm, a) for a in (w, b, mean, var))
    except _NotConstant:
        return None
    scale = torch.rsqrt(var + float(1e-5 if eps is None else eps))
    a = scale if w is None else w * scale
    c = -mean * a if b is None else b - mean * a
    return a.float(), c.float()


def batch_norm_as_affine(
    gm: fx.GraphModule, example_input: torch.Tensor | None = None
) -> fx.GraphModule:
    """A copy of ``gm`` whose inference-mode ``batch_norm`` nodes are ``x · a + c`` (see above).

    Batch norms whose parameters are computed in the graph, or that train, are left as they are.
    A graph without shapes (loaded from an artifact) needs ``example_input`` for the input rank.
    """
    if not any(n.target is aten.batch_norm.default for n in gm.graph.nodes):
        return gm
    gm = copy.deepcopy(gm)
    norms = [n for n in gm.graph.nodes if n.target is aten.batch_norm.default]
    if example_input is not None and any(_shape(n.args[0]) is None for n in norms):
        from .graph import propagate_shapes

        with torch.no_grad():
            propagate_shapes(gm, example_input)
    for i, node in enumerate(norms):
        affine, shape = _affine_of(gm, node), _shape(node.args[0])
        if affine is None or shape is None:
            continue
        view = [-1] + [1] * (len(shape) - 2)
        names = []
        for kind, value in zip(("scale", "shift"), affine, strict=True):
            names.append(f"_bn_affine_{i}_{kind}")
            gm.register_buffer(names[-1], value.reshape(view))
        with gm.graph.inserting_before(node):
            a, c = (gm.graph.get_attr(name) for name in names)
            scaled = gm.graph.call_function(aten.mul.Tensor, (node.args[0], a))
            new = gm.graph.call_function(aten.add.Tensor, (scaled, c))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
