"""hyq-fx inspect --dot/--svg: norms and conv↔transformer bridges coloured, a clear error without
Graphviz."""

from __future__ import annotations

import re
import shutil

import pytest

import hyq_fx.draw
from hyq_fx.cli import main
from hyq_fx.draw import NORM_COLORS, TRANSITION_COLORS, highlight_map
from hyq_fx.graph import detect_norms, find_transitions

MODEL = "embedded:mobilevit_xxs.cifar10"


def test_highlight_map_colours_every_norm_and_bridge(xxs_gm):
    highlight, legend = highlight_map(xxs_gm)
    norms = detect_norms(xxs_gm)
    kinds = {info.kind for info in norms}
    assert kinds == {"batchnorm", "layernorm_tokens"}
    for info in norms:
        assert highlight[info.node] == NORM_COLORS[info.kind]
    transitions = find_transitions(xxs_gm)
    assert len(transitions) == 6  # three MobileViT blocks, in and out
    for t in transitions:
        for name in [*t.nodes, t.exit]:
            assert highlight[name] == TRANSITION_COLORS[t.kind]
    assert legend == {
        "conv->transformer bridge (3)": "orange",
        "transformer->conv bridge (3)": "violet",
        f"batchnorm ({sum(i.kind == 'batchnorm' for i in norms)})": "lightblue",
        f"layernorm_tokens ({sum(i.kind == 'layernorm_tokens' for i in norms)})": "palegreen",
    }


def test_cli_inspect_writes_coloured_dot_and_svg(tmp_path, capsys):
    dot, svg = tmp_path / "g.dot", tmp_path / "g.svg"
    has_dot = shutil.which("dot") is not None
    argv = ["inspect", MODEL, "--dot", str(dot), *(["--svg", str(svg)] if has_dot else [])]
    assert main(argv) == 0
    text = dot.read_text()
    fills = re.findall(r'fillcolor="([a-z]+)"', text)
    assert fills.count("orange") > 3 and fills.count("violet") > 3
    assert fills.count("palegreen") > 3 and fills.count("lightblue") > 3
    assert "cluster_legend" in text
    if not has_dot:
        pytest.skip("Graphviz's dot is not installed: the SVG half is not checked")
    body = svg.read_text()
    assert "<svg" in body and "layer_norm" in body and 'fill="orange"' in body
    assert "wrote" in capsys.readouterr().err


def test_svg_without_graphviz_says_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(hyq_fx.draw.shutil, "which", lambda name: None)
    assert main(["inspect", MODEL, "--svg", str(tmp_path / "g.svg")]) == 2
    out, err = capsys.readouterr()
    assert "install graphviz" in err and "--dot" in err
    assert out == "" and not (tmp_path / "g.svg").exists()  # failed before the capture
