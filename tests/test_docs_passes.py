"""Every registered pass has a page in docs/passes/ that stays in step with the code: its
options, the recipes that use it, and a line in the index."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hyq_fx.pass_base import PASSES
from hyq_fx.recipes import RECIPES

DOCS = Path(__file__).resolve().parents[1] / "docs" / "passes"
SECTIONS = ("## What it does", "## The math", "## When to use it", "## Cost", "## Used by")


def _recipes_using(name: str) -> set[str]:
    return {r for r, recipe in RECIPES.items() if name in {p.name for p in recipe.passes}}


@pytest.mark.parametrize("name", sorted(PASSES))
def test_every_pass_has_a_page(name):
    page = DOCS / f"{name}.md"
    assert page.exists(), f"pass {name!r} has no docs page: write docs/passes/{name}.md"
    text = page.read_text()
    assert text.startswith(f"# `{name}`"), "the page starts with the pass name as its title"
    for section in SECTIONS:
        assert section in text, f"{page.name} lacks the section {section!r}"
    for option in PASSES[name].options():
        assert f"`{option}`" in text, f"{page.name} does not document the option {option!r}"
    used_by = text.split("## Used by")[1].split("\n## ")[0]
    assert set(re.findall(r"`([a-z0-9-]+)`", used_by)) == _recipes_using(name), (
        f"the 'Used by' section of {page.name} must name exactly the recipes that run the pass"
    )


def test_index_links_every_page_and_readme_links_the_index():
    index = (DOCS / "README.md").read_text()
    pages = sorted(p.stem for p in DOCS.glob("*.md") if p.name != "README.md")
    assert pages, "docs/passes holds no pass pages"
    for stem in pages:
        assert f"]({stem}.md)" in index, f"docs/passes/README.md does not link {stem}.md"
    readme = (DOCS.parents[1] / "README.md").read_text()
    assert "docs/passes/README.md" in readme
