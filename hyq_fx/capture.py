"""Capture a model as an ATen-level torch.fx GraphModule with ``torch.export``.

``torch.fx.symbolic_trace`` fails on hybrid models that branch on shapes (MobileViT's
unfolding); ``torch.export`` traces them, and keeps ``nn_module_stack`` in each node's meta,
which passes use to name layers and find blocks.

The captured graph is normalised so passes see one form:

* in-place ops become their functional twins (``silu_`` → ``silu``), so a quantizer inserted on
  an edge can never see its tensor mutated behind it;
* eval-mode ``dropout`` is removed (it is the identity);
* export's guard/assert nodes and pytree input handling are dropped: the module takes the
  example inputs' tensors positionally and returns what the model returned.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence

import torch
from torch import fx, nn

MODULE_PATH = "hyq_module_path"
MODULE_TYPE = "hyq_module_type"


class CaptureError(RuntimeError):
    """The model could not be captured; the message names the module and the construct."""


_DROP_TARGETS = {torch.ops.aten.dropout.default}
_ASSERT_NAMES = ("_assert", "sym_constrain_range", "_assert_tensor_metadata")


def _functional_twin(target):
    """``aten.silu_.default`` → ``aten.silu.default`` (None if there is no such twin)."""
    if not isinstance(target, torch._ops.OpOverload):
        return None
    name = target._schema.name.split("::")[-1]
    if not name.endswith("_") or name.startswith("_"):
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    if packet is None:
        return None
    return getattr(packet, target._overloadname, None)


@contextlib.contextmanager
def _module_tracker(model: nn.Module, stack: list[str]):
    """Keep ``stack`` equal to the path of the modules whose forward is running."""
    handles = []
    names = {m: n for n, m in model.named_modules()}

    def pre(mod, _args):
        stack.append(names.get(mod, "?") or "<root>")

    def post(mod, _args, _out):
        if stack:
            stack.pop()

    for m in names:
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _explain(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    lowered = str(exc).lower()
    if "data-dependent" in lowered or "guard" in lowered:
        hint = (
            "the module branches or sizes a tensor on tensor *values*; rewrite that branch "
            "with torch.cond / torch.where, or mark the value static"
        )
    elif "unsupported" in lowered or "not supported" in lowered:
        hint = "the module uses an operation torch.export cannot trace; replace it with torch ops"
    else:
        hint = "check that the module runs on the example inputs in eval mode"
    return f"{type(exc).__name__}: {first[:400]} (hint: {hint})"


def _module_meta(node: fx.Node) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, mtype = list(stack.values())[-1]
    if str(path).startswith("_empty_nn_module_stack"):  # export's placeholder for size nodes
        return "", ""
    if isinstance(mtype, type):
        mtype = f"{mtype.__module__}.{mtype.__qualname__}"
    return str(path), str(mtype)


def normalize_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """Functionalize in-place ops, drop dropout/asserts/guards, use plain positional codegen."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
            continue
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if any(a in name for a in _ASSERT_NAMES):
            graph.erase_node(node)
            continue
        if node.target in _DROP_TARGETS:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            continue
        twin = _functional_twin(node.target)
        if twin is not None:
            node.target = twin
    for node in graph.nodes:
        path, mtype = _module_meta(node)
        node.meta[MODULE_PATH] = path
        node.meta[MODULE_TYPE] = mtype
    codegen = graph._codegen
    out_spec = getattr(getattr(codegen, "pytree_info", None), "out_spec", None)
    output = graph.output_node()
    flat = output.args[0]
    if out_spec is not None and out_spec.is_leaf() and isinstance(flat, (tuple, list)):
        output.args = (flat[0],)
    graph._codegen = fx.graph.CodeGen()
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    graph.eliminate_dead_code()
    graph.lint()
    # a plain GraphModule: the exported one refuses .eval()/.train() and carries export state
    plain = fx.GraphModule(gm, graph, class_name="CapturedModule")
    plain.meta = {}
    return plain.eval()


def capture(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    dynamic_batch: bool = True,
) -> fx.GraphModule:
    """Trace ``model`` (in eval mode) with torch.export into a normalised ATen GraphModule.

    With ``dynamic_batch`` the leading dimension of every input stays symbolic, so the graph
    runs on any batch size (calibration and evaluation batches differ, the last one is short).
    The model is deep-copied first, so it is never modified, not even its training flag.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture() needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    if not example_inputs or not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise TypeError("capture() needs example inputs: a tensor or a tuple of tensors")
    model = copy.deepcopy(model).eval()
    stack: list[str] = []
    try:
        with _module_tracker(model, stack), torch.no_grad():
            dynamic = (
                tuple({0: torch.export.Dim.AUTO} for _ in example_inputs) if dynamic_batch else None
            )
            exported = torch.export.export(
                model, example_inputs, dynamic_shapes=dynamic, strict=False
            )
    except Exception as exc:  # torch.export raises many types; we re-raise one clear error
        where = stack[-1] if stack else "<root>"
        mod = model.get_submodule(where) if where not in ("<root>", "?") else model
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: it failed inside module "
            f"'{where}' ({type(mod).__name__}) with {_explain(exc)}"
        ) from exc
    gm = exported.module()
    return normalize_graph(gm)
