"""Pass infrastructure: a context, a base class with pre/postconditions, a registry.

A pass is a ``torch.fx`` :class:`~torch.fx.passes.infra.pass_base.PassBase`: calling it on a
GraphModule runs ``requires`` (precondition), ``call`` (the rewrite, returning
``PassResult(gm, modified)``) and ``ensures`` (postcondition). Passes rewrite the module they
are given; :func:`hyq_fx.quantize` hands them a fresh capture, never the user's model.

Passes are registered by name so that a recipe, a JSON list of ``{"pass": name, "args": {}}``,
can name them.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .vocabulary import get_attr_tensor, owner_of, quantizers, quantizers_mode

__all__ = [
    "HyqPass",
    "PassResult",
    "QuantContext",
    "PASSES",
    "PassError",
    "register_pass",
    "get_pass",
    "quantizers",
]


class PassError(ValueError):
    """A pass was misconfigured or its precondition does not hold."""


def check_bits_option(owner: str, what: str, value: Any) -> int | None:
    """``value`` if it is a bit width a pass may be limited to (an int >= 2) or None, else a
    PassError naming ``owner`` (the pass) and ``what`` (the option)."""
    if value is not None and (not isinstance(value, int) or value < 2):
        raise PassError(f"{owner}: {what} must be an int >= 2 or null, got {value!r}")
    return value


@dataclass
class QuantContext:
    """What passes share: calibration batches, default bit widths, the seed, progress bars."""

    calib_batches: list[torch.Tensor] = field(default_factory=list)
    w_bits: int = 8
    a_bits: int = 8
    seed: int = 0
    progress: bool = True
    log: list[dict[str, Any]] = field(default_factory=list)


class HyqPass(PassBase):
    """Base of hyq-fx passes: ``name`` for the registry, options as keyword arguments."""

    name: ClassVar[str] = ""

    def __init__(self, ctx: QuantContext | None = None) -> None:
        self.ctx = ctx or QuantContext()

    def call(self, graph_module: fx.GraphModule) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def options(cls) -> dict[str, Any]:
        """The keyword options a recipe may set, with their defaults."""
        sig = inspect.signature(cls.__init__)
        return {
            k: p.default
            for k, p in sig.parameters.items()
            if k not in ("self", "ctx") and p.kind == p.KEYWORD_ONLY
        }

    @classmethod
    def summary(cls) -> str:
        doc = inspect.getdoc(cls) or ""
        return doc.splitlines()[0] if doc else cls.name


PASSES: dict[str, type[HyqPass]] = {}


def register_pass(cls: type[HyqPass]) -> type[HyqPass]:
    if not cls.name:
        raise PassError(f"{cls.__qualname__} has no `name`")
    if cls.name in PASSES and PASSES[cls.name] is not cls:
        raise PassError(f"a pass named {cls.name!r} is already registered")
    PASSES[cls.name] = cls
    return cls


def get_pass(name: str) -> type[HyqPass]:
    try:
        return PASSES[name]
    except KeyError:
        raise PassError(
            f"unknown pass {name!r}; registered passes: {', '.join(sorted(PASSES))}"
        ) from None


def build_pass(name: str, args: dict[str, Any], ctx: QuantContext) -> HyqPass:
    cls = get_pass(name)
    allowed = cls.options()
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise PassError(
            f"pass {name!r} has no option(s) {unknown}; its options are {sorted(allowed) or 'none'}"
        )
    return cls(ctx, **args)


# ---------------------------------------------------------------- graph helpers used by passes


def get_tensor(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The parameter or buffer a ``get_attr`` node reads; PassError for any other node."""
    if node.op != "get_attr":
        raise PassError(f"node {node.name} is not a constant (get_attr), it is {node.op}")
    return get_attr_tensor(gm, node.target)


def _unique_attr(gm: fx.GraphModule, hint: str) -> str:
    base = re.sub(r"[^0-9a-zA-Z_]", "_", hint).strip("_") or "const"
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def add_constant(gm: fx.GraphModule, hint: str, tensor: torch.Tensor, before: fx.Node) -> fx.Node:
    """Register ``tensor`` as a buffer of ``gm``; return a ``get_attr`` node before ``before``."""
    name = _unique_attr(gm, hint)
    gm.register_buffer(name, tensor.detach().clone())
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = tensor
    return node


def add_module_call(
    gm: fx.GraphModule, hint: str, module: torch.nn.Module, arg: fx.Node, after: fx.Node
) -> fx.Node:
    """Add ``module`` as a submodule and a ``call_module`` node on ``arg``, after ``after``."""
    name = _unique_attr(gm, hint)
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(after):
        node = gm.graph.call_module(name, (arg,))
    copy_module_meta(arg, node)
    return node


def copy_module_meta(src: fx.Node, dst: fx.Node) -> None:
    for key, value in src.meta.items():
        if key.startswith("hyq_module") or key == "nn_module_stack":
            dst.meta[key] = value


def prune_unused_attributes(gm: fx.GraphModule) -> None:
    """Drop dead nodes, then the parameters, buffers and submodules no node reads any more."""
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        owner_path = name.rpartition(".")[0]
        if name in used or any(owner_path == m or owner_path.startswith(m + ".") for m in modules):
            continue  # read by a node, or a called module's own state (a quantizer's scale)
        owner, attr = owner_of(gm, name)
        owner._parameters.pop(attr, None)
        owner._buffers.pop(attr, None)
    gm.delete_all_unused_submodules()


def record_node_outputs(
    gm: fx.GraphModule, batch: torch.Tensor, names: set[str] | list[str]
) -> dict[str, torch.Tensor]:
    """Run ``gm`` on ``batch`` and return the (detached) outputs of the nodes named ``names``."""
    wanted = set(names)
    found: dict[str, torch.Tensor] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node):
            out = super().run_node(n)
            if n.name in wanted:
                found[n.name] = out.detach() if isinstance(out, torch.Tensor) else out
            return out

    with torch.no_grad():
        _Recorder(gm).run(batch)
    return found


def holdout_images(batches: list[torch.Tensor], skip: int, n: int) -> torch.Tensor | None:
    """Calibration images ``skip .. skip + n`` (those a pass did not fit on), or None if none."""
    if n <= 0 or not batches:
        return None
    rest = torch.cat(batches)[skip : skip + n]
    return rest if rest.shape[0] else None


def float_outputs(gm: fx.GraphModule, images: torch.Tensor) -> list[torch.Tensor]:
    """``gm``'s outputs with every quantizer off, per batch of 32 (the reference of
    :func:`output_kl` for a pass that changes float parameters, e.g. biases)."""
    with torch.no_grad(), quantizers_mode(gm, "off"):
        return [gm(batch) for batch in images.split(32)]


def output_kl(
    gm: fx.GraphModule,
    images: torch.Tensor,
    who: str,
    reference: list[torch.Tensor] | None = None,
) -> float:
    """Mean ``KL(softmax(f(x)) ‖ softmax(f_q(x)))`` of ``gm``'s output over ``images``: the
    quantized model against its float self (every quantizer off, or ``reference`` from
    :func:`float_outputs` taken before a pass changed float parameters). Passes use it to
    accept or undo what they did, on calibration images they did not fit on."""
    refs = reference if reference is not None else float_outputs(gm, images)
    total = 0.0
    with torch.no_grad():
        for batch, ref in zip(images.split(32), refs, strict=True):
            got = gm(batch)
            if not (isinstance(ref, torch.Tensor) and ref.is_floating_point()):
                raise PassError(
                    f"{who}: the held-out check needs a model returning one float tensor "
                    f"(got {type(ref).__name__}); pass holdout=0 to skip it"
                )
            ref, got = ref.reshape(ref.shape[0], -1), got.reshape(got.shape[0], -1)
            total += torch.nn.functional.kl_div(
                got.double().log_softmax(-1), ref.double().log_softmax(-1),
                reduction="sum", log_target=True,
            ).item()  # fmt: skip
    return total / images.shape[0]


def first_images(batches: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """The calibration batches cut to their first ``n`` images in all."""
    out: list[torch.Tensor] = []
    kept = 0
    for batch in batches:
        if kept >= n:
            break
        out.append(batch[: n - kept])
        kept += out[-1].shape[0]
    return out


def run_passes(
    gm: fx.GraphModule,
    passes: list[HyqPass],
    on_result: Callable[[HyqPass, PassResult], None] | None = None,
) -> fx.GraphModule:
    for p in passes:
        result = p(gm)
        if result is None:
            result = PassResult(gm, True)
        gm = result.graph_module
        gm.graph.lint()
        gm.recompile()
        if on_result is not None:
            on_result(p, result)
    return gm
