"""A small dataflow-pattern language over torch.fx nodes, in the style of TVM Relax's DFPattern.

A pass declares its pattern once and rewrites every match in one callback::

    conv = is_op(aten.conv2d.default)(wildcard(), is_const(), ...).named("conv")
    bn = is_op(aten.batch_norm.default)(conv, is_const(), is_const(), ...).named("bn")
    for m in match_all(gm, bn): ...   # m["conv"], m["bn"] are fx.Nodes

``...`` (Ellipsis) at the end of an argument list means "the remaining arguments are not
constrained". Patterns match positional arguments only.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import fx


class Pattern:
    binding: str | None = None

    def named(self, name: str) -> Pattern:
        """A copy of this pattern that binds the matched value to ``name``."""
        named = copy.copy(self)
        named.binding = name
        return named

    def _match(self, value: Any, bindings: dict[str, Any]) -> bool:
        raise NotImplementedError

    def match(self, value: Any, bindings: dict[str, Any]) -> bool:
        if not self._match(value, bindings):
            return False
        if self.binding is not None:
            if self.binding in bindings and bindings[self.binding] is not value:
                return False
            bindings[self.binding] = value
        return True

    def __or__(self, other: Pattern) -> Pattern:
        return AltPattern(self, other)


class Wildcard(Pattern):
    def _match(self, value: Any, bindings: dict[str, Any]) -> bool:
        return True


class ConstPattern(Pattern):
    """A parameter or buffer of the module (a ``get_attr`` node)."""

    def _match(self, value: Any, bindings: dict[str, Any]) -> bool:
        return isinstance(value, fx.Node) and value.op == "get_attr"


class NonePattern(Pattern):
    def _match(self, value: Any, bindings: dict[str, Any]) -> bool:
        return value is None


@dataclass
class AltPattern(Pattern):
    left: Pattern
    right: Pattern

    def _match(self, value: Any, bindings: dict[str, Any]) -> bool:
        trial = dict(bindings)
        if self.left.match(value, trial):
            bindings.update(trial)
            return True
        return self.right.match(value, bindings)


@dataclass
class OpPattern(Pattern):
    targets: tuple[Any, ...]
    args: tuple[Pattern, ...] | None = None
    open_ended: bool = False
    single_use: bool = field(default=False)

    def __call__(self, *args: Any) -> OpPattern:
        open_ended = bool(args) and args[-1] is Ellipsis
        pats = tuple(a for a in args if a is not Ellipsis)
        return OpPattern(self.targets, pats, open_ended, self.single_use)

    def only_used_once(self) -> OpPattern:
        """A copy that matches only a node with one user (so rewriting it is safe)."""
        return OpPattern(self.targets, self.args, self.open_ended, True)

    def _match(self, value: Any, bindings: dict[str, Any]) -> bool:
        if not (isinstance(value, fx.Node) and value.op == "call_function"):
            return False
        if value.target not in self.targets:
            return False
        if self.single_use and len(value.users) != 1:
            return False
        if self.args is None:
            return True
        if len(value.args) < len(self.args) or (
            not self.open_ended and len(value.args) != len(self.args)
        ):
            return False
        return all(p.match(a, bindings) for p, a in zip(self.args, value.args, strict=False))


def is_op(*targets: Any) -> OpPattern:
    return OpPattern(tuple(targets))


def wildcard() -> Wildcard:
    return Wildcard()


def is_const() -> ConstPattern:
    return ConstPattern()


def is_none() -> NonePattern:
    return NonePattern()


def match(pattern: Pattern, node: fx.Node) -> dict[str, Any] | None:
    bindings: dict[str, Any] = {}
    return bindings if pattern.match(node, bindings) else None


def match_all(gm: fx.GraphModule, pattern: Pattern) -> Iterator[dict[str, Any]]:
    """Every match rooted at a node of ``gm``, in graph order (a snapshot of the node list)."""
    for node in list(gm.graph.nodes):
        found = match(pattern, node)
        if found is not None:
            yield found
