"""Save and load captured (and quantized) GraphModules without pickle.

A saved model is a directory with two files:

* ``graph.json``: the format version, the nodes in order (name, op, target as a string such as
  ``"aten.conv2d.default"`` or ``"operator.getitem"``, args/kwargs as tagged JSON, the
  ``hyq_*`` meta keys), the ``FakeQuantizer`` modules by their config, the kind, shape and dtype
  of every tensor, and the caller's metadata;
* ``model.safetensors``: every parameter and buffer.

Loading resolves call_function targets only from an allow-list (``torch.ops.aten``,
``torch.ops.prims`` overloads and ``operator`` builtins), so a file cannot make it call
anything else.
"""

from __future__ import annotations

import json
import operator
import re
import types
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import fx, nn

from .quantizer import FakeQuantizer

FORMAT_NAME = "hyq-fx.graph"
FORMAT_VERSION = 1
GRAPH_FILE = "graph.json"
TENSOR_FILE = "model.safetensors"

_OP_NAMESPACES = ("aten", "prims")
_METHOD_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_DENIED_OPERATORS = {"call"}
_NODE_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")


class SerializationError(RuntimeError):
    """A model that cannot be saved, or a saved directory that cannot be loaded."""


# --- targets -------------------------------------------------------------------------------


def _resolve_target(text: str, where: str = "") -> Any:
    """``"aten.conv2d.default"`` → the OpOverload; ``"operator.getitem"`` → the builtin."""
    parts = text.split(".") if isinstance(text, str) else []
    if len(parts) == 2 and parts[0] == "operator" and parts[1] not in _DENIED_OPERATORS:
        fn = getattr(operator, parts[1], None) if not parts[1].startswith("_") else None
        if isinstance(fn, types.BuiltinFunctionType):
            return fn
    elif len(parts) == 3 and parts[0] in _OP_NAMESPACES:
        try:
            overload = getattr(getattr(getattr(torch.ops, parts[0]), parts[1]), parts[2])
        except (AttributeError, RuntimeError):
            overload = None
        if isinstance(overload, torch._ops.OpOverload):
            return overload
    raise SerializationError(
        f"{where}call_function target {text!r} is not allowed or does not exist in this torch "
        f"{torch.__version__}: targets must be torch.ops.<{'|'.join(_OP_NAMESPACES)}>.<op>."
        "<overload> or operator.<builtin>"
    )


def _encode_target(node: fx.Node) -> str:
    target = node.target
    if node.op != "call_function":
        if not isinstance(target, str):
            raise SerializationError(f"node {node.name!r} ({node.op}) has a non-string target")
        if node.op == "call_method" and not _METHOD_NAME.match(target):
            raise SerializationError(f"node {node.name!r} calls method {target!r}: not allowed")
        return target
    if isinstance(target, torch._ops.OpOverload):
        op = target._schema.name.split("::")[-1]
        text = f"{target.namespace}.{op}.{target._overloadname}"
    else:
        text = f"operator.{getattr(target, '__name__', '?')}"
    try:
        if _resolve_target(text) is target:
            return text
    except SerializationError:
        pass
    raise SerializationError(
        f"node {node.name!r} calls {target!r}, which cannot be saved: only torch.ops."
        f"<{'|'.join(_OP_NAMESPACES)}> overloads and operator builtins are supported"
    )


# --- args and kwargs -----------------------------------------------------------------------


def _encode(value: Any, node: fx.Node) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, node) for v in value]}
    if isinstance(value, list):
        return [_encode(v, node) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _encode(v, node) for k, v in value.items()}}
    if isinstance(value, slice):
        return {"slice": [_encode(v, node) for v in (value.start, value.stop, value.step)]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    raise SerializationError(
        f"node {node.name!r} ({node.op} {node.target}) has an argument of type "
        f"{type(value).__module__}.{type(value).__qualname__}, which cannot be saved"
    )


_TORCH_ENUMS = {
    "dtype": torch.dtype,
    "memory_format": torch.memory_format,
    "layout": torch.layout,
}


def _decode(value: Any, env: dict[str, fx.Node]) -> Any:
    if isinstance(value, list):
        return [_decode(v, env) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        raise SerializationError(f"malformed argument in {GRAPH_FILE}: {value!r}")
    ((tag, body),) = value.items()
    if tag == "node":
        if body not in env:
            raise SerializationError(f"argument refers to node {body!r} before it is defined")
        return env[body]
    if tag == "tuple":
        return tuple(_decode(v, env) for v in body)
    if tag == "dict":
        return {k: _decode(v, env) for k, v in body.items()}
    if tag == "slice":
        return slice(*(_decode(v, env) for v in body))
    if tag == "device":
        return torch.device(body)
    if tag in _TORCH_ENUMS:
        found = getattr(torch, body, None) if isinstance(body, str) else None
        if isinstance(found, _TORCH_ENUMS[tag]):
            return found
    raise SerializationError(f"malformed argument in {GRAPH_FILE}: {value!r}")


def _json_meta(node: fx.Node) -> dict[str, Any]:
    out = {}
    for key, val in node.meta.items():
        if not key.startswith("hyq_"):
            continue
        try:
            json.dumps(val, allow_nan=False)
        except (TypeError, ValueError):
            continue  # not JSON-able: dropped, as documented
        out[key] = val
    return out


def _owner(root: nn.Module, path: str, create: bool = True) -> tuple[nn.Module, str]:
    """The module that holds ``path``'s last field, creating plain modules on the way."""
    *prefix, field = path.split(".")
    module = root
    for item in prefix:
        child = getattr(module, item, None)
        if child is None and create:
            child = nn.Module()
            module.add_module(item, child)
        if not isinstance(child, nn.Module):
            raise SerializationError(f"{path!r}: {item!r} is not a module")
        module = child
    return module, field


# --- save ----------------------------------------------------------------------------------


def _state(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """``gm.state_dict()`` plus tensors that get_attr nodes read but it lacks (constants)."""
    state = gm.state_dict()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in state:
            owner, field = _owner(gm, node.target, create=False)
            value = getattr(owner, field, None)
            if not isinstance(value, torch.Tensor):
                raise SerializationError(
                    f"get_attr node {node.name!r} reads {node.target!r}, which is a "
                    f"{type(value).__name__}, not a tensor: only tensors can be saved"
                )
            state[node.target] = value
    return state


def save_graph_module(
    gm: fx.GraphModule, out_dir: str | Path, metadata: dict | None = None
) -> None:
    """Write ``out_dir/graph.json`` and ``out_dir/model.safetensors`` (no pickle)."""
    nodes, modules = [], {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if not isinstance(module, FakeQuantizer):
                raise SerializationError(
                    f"node {node.name!r} calls module {node.target!r} of type "
                    f"{type(module).__name__}: only FakeQuantizer modules can be saved"
                )
            modules[node.target] = module.config()
        nodes.append(
            {
                "name": node.name,
                "op": node.op,
                "target": _encode_target(node),
                "args": _encode(list(node.args), node),
                "kwargs": _encode(dict(node.kwargs), node)["dict"],
                "meta": _json_meta(node),
            }
        )
    state = _state(gm)
    params = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    tensors = {
        name: {
            "kind": "parameter" if name in params else "buffer",
            "shape": list(value.shape),
            "dtype": str(value.dtype),
        }
        for name, value in state.items()
    }
    graph = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "nodes": nodes,
        "modules": {
            target: {"type": "FakeQuantizer", "config": cfg} for target, cfg in modules.items()
        },
        "tensors": tensors,
        "metadata": metadata or {},
    }
    try:
        text = json.dumps(graph, indent=1)
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"metadata or a module config is not JSON-able: {exc}") from exc
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage (views, tied weights)
    save_file(
        {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(out / TENSOR_FILE)
    )
    (out / GRAPH_FILE).write_text(text)


# --- load ----------------------------------------------------------------------------------


def _place(root: nn.Module, values: dict[str, torch.Tensor]) -> None:
    for name, value in values.items():
        owner, field = _owner(root, name)
        if isinstance(value, nn.Parameter):
            owner.register_parameter(field, value)
        else:
            owner.register_buffer(field, value)  # replaces e.g. a FakeQuantizer's scale


def _read_files(out_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    hint = "it should come from `hyq-fx quantize --out` or hyq_fx.save_graph_module()"
    if not out_dir.is_dir():
        raise SerializationError(f"no saved model directory at {out_dir}: {hint}")
    for name in (GRAPH_FILE, TENSOR_FILE):
        if not (out_dir / name).is_file():
            raise SerializationError(f"{out_dir} has no {name}: {hint}")
    try:
        data = json.loads((out_dir / GRAPH_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise SerializationError(f"{out_dir / GRAPH_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise SerializationError(f"{out_dir / GRAPH_FILE} is not a hyq-fx graph file")
    if data.get("version") != FORMAT_VERSION:
        raise SerializationError(
            f"{out_dir / GRAPH_FILE} has format version {data.get('version')!r}; this hyq-fx "
            f"reads version {FORMAT_VERSION} (was it written by another hyq-fx release?)"
        )
    missing = [
        k for k in ("nodes", "modules", "tensors") if not isinstance(data.get(k), dict | list)
    ]
    if missing:
        raise SerializationError(f"{out_dir / GRAPH_FILE} lacks {missing}: the file is damaged")
    try:
        tensors = load_file(str(out_dir / TENSOR_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SerializationError(
            f"{out_dir / TENSOR_FILE} is not a readable safetensors file ({exc}); the result is "
            "damaged or incomplete: quantize again"
        ) from exc
    return data, tensors


def _check_tensors(specs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(specs) - set(tensors))
    wrong = []
    for name, spec in specs.items():
        found = tensors.get(name)
        if found is None:
            continue
        shape, dtype = list(found.shape), str(found.dtype)
        if (shape, dtype) != (spec["shape"], spec["dtype"]):
            wrong.append(f"{name}: expected {spec['shape']} {spec['dtype']}, found {shape} {dtype}")
    if missing or wrong:
        lines = [f"missing: {', '.join(missing)}"] if missing else []
        lines += [f"mismatched: {'; '.join(wrong)}"] if wrong else []
        raise SerializationError(f"{TENSOR_FILE} does not match {GRAPH_FILE}: " + " | ".join(lines))


def load_graph_module(out_dir: str | Path) -> tuple[fx.GraphModule, dict]:
    """Load what :func:`save_graph_module` wrote: ``(module in eval mode, metadata)``."""
    data, tensors = _read_files(Path(out_dir))
    specs = data["tensors"]
    _check_tensors(specs, tensors)

    root = nn.Module()
    for target, entry in data["modules"].items():
        if entry.get("type") != "FakeQuantizer":
            kind = entry.get("type")
            raise SerializationError(f"module {target!r} has unsupported type {kind!r}")
        owner, field = _owner(root, target)
        owner.add_module(field, FakeQuantizer.from_config(entry["config"]))
    values = {
        name: nn.Parameter(tensors[name]) if spec["kind"] == "parameter" else tensors[name]
        for name, spec in specs.items()
    }
    _place(root, values)

    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for entry in data["nodes"]:
        op, target = entry["op"], entry["target"]
        if op not in _NODE_OPS:
            raise SerializationError(f"node {entry['name']!r} has unknown op {op!r}")
        if op == "call_function":
            target = _resolve_target(target, f"node {entry['name']!r}: ")
        elif op == "call_method" and not _METHOD_NAME.match(target):
            raise SerializationError(f"node {entry['name']!r} calls method {target!r}: not allowed")
        elif op == "call_module" and target not in data["modules"]:
            raise SerializationError(f"node {entry['name']!r} calls unknown module {target!r}")
        args = tuple(_decode(entry["args"], env))
        kwargs = {k: _decode(v, env) for k, v in entry["kwargs"].items()}
        node = graph.create_node(op, target, args, kwargs, name=entry["name"])
        node.meta.update(entry.get("meta", {}))
        env[entry["name"]] = node
    try:
        graph.lint()
        gm = fx.GraphModule(root, graph)
    except (RuntimeError, AttributeError) as exc:
        raise SerializationError(f"the saved graph in {out_dir} is invalid: {exc}") from exc
    _place(gm, values)  # GraphModule() copies only what nodes use; keep every saved tensor
    return gm.eval(), data.get("metadata", {})
