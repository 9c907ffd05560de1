"""Draw a captured graph with its normalisations and conv↔transformer transitions coloured.

``hyq-fx inspect MODEL --dot OUT.dot --svg OUT.svg`` calls :func:`draw_graph`: every norm node
is filled with the colour of its kind (:data:`NORM_COLORS`, from :func:`hyq_fx.graph.tag_norms`),
every conv→transformer bridge (the last conv-side node, the reshape/permute/unfold chain and its
exit) orange and every transformer→conv bridge violet (:func:`hyq_fx.graph.transition_highlight`),
with a legend of the colours that occur. SVG needs Graphviz's ``dot`` program on ``PATH``.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from torch import fx

from .graph import find_transitions, tag_norms, to_dot, transition_highlight

NORM_COLORS = {
    "batchnorm": "lightblue",
    "layernorm_tokens": "palegreen",
    "layernorm_nhwc": "mediumseagreen",
    "layernorm2d": "aquamarine",
    "groupnorm1": "khaki",
    "groupnorm": "gold",
    "other": "lightgrey",
}
TRANSITION_COLORS = {"conv->transformer": "orange", "transformer->conv": "violet"}


class GraphvizNotFoundError(FileNotFoundError):
    """``--svg`` was asked for where Graphviz's ``dot`` program is not installed."""


def require_dot() -> str:
    """The path of Graphviz's ``dot``, or a :class:`GraphvizNotFoundError` saying what to do."""
    dot = shutil.which("dot")
    if dot is None:
        raise GraphvizNotFoundError(
            "--svg needs Graphviz's `dot` program, which is not on PATH: install graphviz "
            "(apt-get install graphviz, brew install graphviz or conda install graphviz), or write "
            "the graph with --dot OUT.dot and render it elsewhere with `dot -Tsvg OUT.dot`"
        )
    return dot


def highlight_map(gm: fx.GraphModule) -> tuple[dict[str, str], dict[str, str]]:
    """``(node name → fill colour, legend caption → colour)`` for norms and transitions.

    A node that is both part of a bridge and a norm (rare: a norm read straight off a bridge)
    keeps the norm's colour. The legend lists only the kinds present, with their counts.
    """
    transitions = find_transitions(gm)
    colors = (TRANSITION_COLORS["conv->transformer"], TRANSITION_COLORS["transformer->conv"])
    highlight = transition_highlight(transitions, colors)
    legend = {}
    for kind, color in TRANSITION_COLORS.items():
        n = sum(t.kind == kind for t in transitions)
        if n:
            legend[f"{kind} bridge ({n})"] = color
    norms = tag_norms(gm)
    for kind, color in NORM_COLORS.items():
        names = [info.node for info in norms if info.kind == kind]
        highlight.update(dict.fromkeys(names, color))
        if names:
            legend[f"{kind} ({len(names)})"] = color
    return highlight, legend


def render_svg(dot_path: str | Path, svg_path: str | Path) -> Path:
    """Run ``dot -Tsvg`` on a DOT file; returns the SVG path."""
    out = Path(svg_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [require_dot(), "-Tsvg", str(dot_path), "-o", str(out)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return out


def draw_graph(
    gm: fx.GraphModule,
    dot: str | Path | None = None,
    svg: str | Path | None = None,
    title: str | None = None,
) -> list[Path]:
    """Write the highlighted graph as DOT (``dot``) and/or SVG (``svg``); returns the paths."""
    if svg is not None:
        require_dot()  # fail before any work
    highlight, legend = highlight_map(gm)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        dot_path = Path(dot) if dot is not None else Path(tmp) / "graph.dot"
        to_dot(gm, dot_path, highlight=highlight, title=title, legend=legend)
        if dot is not None:
            written.append(dot_path)
        if svg is not None:
            written.append(render_svg(dot_path, svg))
    return written
