"""Recipes: named, JSON-serialisable lists of passes with their arguments.

A recipe is configuration as data (like a timm model config)::

    {"name": "minmax", "description": "...", "passes": [
        {"pass": "decompose_attention"},
        {"pass": "insert_quantizers", "args": {"activation": {"observer": "minmax"}}},
        {"pass": "calibrate"}]}

``get_recipe`` takes a registered name or the path of such a JSON file. The built-in recipes
are the files of ``hyq_fx/recipe_zoo/``, one JSON file per recipe.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .pass_base import PASSES, HyqPass, PassError, QuantContext, build_pass


class RecipeError(ValueError):
    """A recipe that cannot be used: unknown name, malformed JSON, bad pass entry."""


# ``when`` keys of a pass entry: the step runs only at the bit widths they allow
WHEN_KEYS = ("min_w_bits", "max_w_bits", "min_a_bits", "max_a_bits")


@dataclass(frozen=True)
class PassStep:
    name: str
    args: dict[str, Any] = field(default_factory=dict)
    when: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        # a copy: callers may edit the dict without changing the registered recipe
        out: dict[str, Any] = {"pass": self.name}
        if self.args:
            out["args"] = copy.deepcopy(self.args)
        if self.when:
            out["when"] = dict(self.when)
        return out

    def applies(self, w_bits: int, a_bits: int) -> bool:
        """Whether the step runs for these bit widths (its ``when`` bounds are inclusive)."""
        bits = {"w": w_bits, "a": a_bits}
        for key, bound in self.when.items():
            side, kind = key.split("_")[:2]  # e.g. "max_a_bits" -> ("max", "a")
            if (side == "min" and bits[kind] < bound) or (side == "max" and bits[kind] > bound):
                return False
        return True


def _parse_when(when: Any, here: str) -> dict[str, int]:
    if not isinstance(when, dict):
        raise RecipeError(f"{here}: 'when' must be an object such as {{\"max_a_bits\": 6}}")
    bad = sorted(set(when) - set(WHEN_KEYS))
    if bad:
        raise RecipeError(f"{here}: unknown 'when' key(s) {bad}; use some of {list(WHEN_KEYS)}")
    for key, value in when.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 16:
            raise RecipeError(f"{here}: when.{key} must be a bit width in [2, 16], got {value!r}")
    return dict(when)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    passes: tuple[PassStep, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "passes": [p.to_dict() for p in self.passes],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: a recipe is a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"name", "description", "passes"})
        if unknown:
            raise RecipeError(
                f"{where}: unknown key(s) {unknown}; a recipe has 'name', 'description', 'passes'"
            )
        for key in ("name", "passes"):
            if key not in data:
                raise RecipeError(f"{where}: missing key '{key}'")
        if not isinstance(data["passes"], list) or not data["passes"]:
            raise RecipeError(f"{where}: 'passes' must be a non-empty list of pass entries")
        steps = []
        for i, entry in enumerate(data["passes"]):
            here = f"{where}: passes[{i}]"
            if not isinstance(entry, dict) or "pass" not in entry:
                raise RecipeError(f"{here} must be an object with a 'pass' key, got {entry!r}")
            extra = sorted(set(entry) - {"pass", "args", "when"})
            if extra:
                raise RecipeError(f"{here}: unknown key(s) {extra}; use 'pass', 'args' and 'when'")
            args = entry.get("args", {})
            if not isinstance(args, dict):
                raise RecipeError(f"{here}: 'args' must be an object, got {args!r}")
            if not isinstance(entry["pass"], str):
                raise RecipeError(
                    f"{here}: 'pass' must be a pass name (a string), got {entry['pass']!r}"
                )
            if entry["pass"] not in PASSES:
                raise RecipeError(
                    f"{here}: unknown pass {entry['pass']!r}; registered passes: "
                    f"{', '.join(sorted(PASSES))}"
                )
            allowed = PASSES[entry["pass"]].options()
            bad = sorted(set(args) - set(allowed))
            if bad:
                raise RecipeError(
                    f"{here}: pass {entry['pass']!r} has no option(s) {bad}; its options are "
                    f"{sorted(allowed) or 'none'}"
                )
            when = _parse_when(entry.get("when", {}), here)
            steps.append(PassStep(entry["pass"], args, when))
        return cls(str(data["name"]), str(data.get("description", "")), tuple(steps))

    def build(self, ctx: QuantContext) -> list[HyqPass]:
        """The recipe's passes, constructed (their options are validated here, before any work).

        A bad option value raises :class:`RecipeError` naming the recipe, the entry
        ``passes[i]`` and the pass. A step whose ``when`` excludes ``ctx``'s bit widths is
        left out (and ``ctx.log`` says so).
        """
        built = []
        for i, step in enumerate(self.passes):
            try:  # built even when skipped, so that a bad option fails at every bit width
                built_pass = build_pass(step.name, step.args, ctx)
            except (PassError, ValueError, TypeError, KeyError) as exc:
                reason = str(exc).removeprefix(f"{step.name}: ")
                raise RecipeError(
                    f"recipe {self.name!r}: passes[{i}] ({step.name}): {reason}; fix the "
                    "'args' of that entry"
                ) from exc
            if step.applies(ctx.w_bits, ctx.a_bits):
                built.append(built_pass)
            else:
                ctx.log.append({"pass": step.name, "skipped": f"when {step.when}"})
        return built


RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe | dict[str, Any]) -> Recipe:
    if isinstance(recipe, dict):
        recipe = Recipe.from_dict(recipe)
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name_or_path: str | Recipe) -> Recipe:
    """A registered recipe by name, or one read from a JSON file path."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    if name_or_path in RECIPES:
        return RECIPES[name_or_path]
    path = Path(name_or_path)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise RecipeError(
                f"recipe file {path} is not valid JSON: {exc.msg} at line {exc.lineno}, "
                f"column {exc.colno}"
            ) from None
        return Recipe.from_dict(data, where=str(path))
    raise RecipeError(
        f"unknown recipe {name_or_path!r}; registered recipes: {', '.join(sorted(RECIPES))} "
        "(or give the path of a recipe .json file)"
    )


ZOO = Path(__file__).resolve().parent / "recipe_zoo"


def _register_builtin() -> None:
    """Register the passes and every recipe of ``recipe_zoo/*.json`` (one file per recipe)."""
    from . import passes  # noqa: F401  (importing the package registers the passes)

    for path in sorted(ZOO.glob("*.json")):
        register_recipe(get_recipe(str(path)))
