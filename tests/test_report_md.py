"""report.md and its plots: `hyq-fx quantize --report` on the bundled checkpoint, and the parts."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import MODEL, _folder

import hyq_fx
from hyq_fx.cli import main
from hyq_fx.report_md import (
    CONFUSION_PNG,
    RANGES_PNG,
    SQNR_PNG,
    channel_ranges,
    label,
    prediction_confusion,
    worst_layers,
    write_report_md,
)

IMAGE = re.compile(r"!\[[^]]*\]\(([^)]+)\)")


@pytest.fixture(scope="module")
def w4a8_out(tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    calib, evaluation = _folder(base / "calib", 1), _folder(base / "eval", 1, seed=1)
    out = base / "out"
    argv = ["quantize", MODEL, "--calib", str(calib), "--eval", str(evaluation), "--out", str(out)]
    assert main([*argv, "--calib-size", "4", "--w-bits", "4", "--report", "--no-progress",
                 "--recipe", "minmax"]) == 0  # fmt: skip
    return out, json.loads((out / "report.json").read_text())


def _png_ok(path) -> bool:
    with Image.open(path) as im:
        return im.format == "PNG" and min(im.size) > 100


def test_cli_report_md_references_every_plot(w4a8_out):
    out, report = w4a8_out
    md = (out / "report.md").read_text()
    assert sorted(IMAGE.findall(md)) == sorted([SQNR_PNG, RANGES_PNG, CONFUSION_PNG])
    assert all(_png_ok(out / name) for name in IMAGE.findall(md))
    assert f"| {report['fp32_top1']} | {report['quant_top1']} |" in md
    assert "W4A8" in md.splitlines()[0]
    worst_part = md.split("## Input activation")[0]
    for row in worst_layers(report["layers"], 5):  # the worst layers are named
        assert f"`{label(row)}`" in worst_part
    table = md.split("## Bits, granularity and scheme per layer")[1]
    assert table.count("\n| ") == len(report["layers"]) + 1  # header + one row per op


def test_report_md_without_predictions_has_no_confusion(tmp_path, w4a8_out):
    out, report = w4a8_out
    batch = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    md = write_report_md(tmp_path, {"layers": report["layers"]}, hyq_fx.load(out), batch)
    text = md.read_text()
    assert CONFUSION_PNG not in text and not (tmp_path / CONFUSION_PNG).exists()
    assert "top-1 not measured" in text and (tmp_path / SQNR_PNG).exists()


def test_channel_ranges_of_the_stem_are_the_image_ranges(w4a8_out):
    out, report = w4a8_out
    stem = report["layers"][0]
    assert stem["op"] == "conv2d"
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    (key, r), *more = channel_ranges(hyq_fx.load(out), x, [stem]).items()
    assert key == f"{label(stem)} input 0" and not more
    np.testing.assert_allclose(r["min"], x.amin(dim=(0, 2, 3)).numpy())
    np.testing.assert_allclose(r["max"], x.amax(dim=(0, 2, 3)).numpy())
    lo, hi = r["clip"]  # min-max calibrated on images in [0, 1] (mean 0, std 1)
    assert abs(lo) < 0.01 and 0.95 < hi < 1.05


def test_confusion_and_worst_layers():
    m = prediction_confusion([0, 1, 1, 2], [0, 2, 1, 2], 3)
    assert m.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    rows = [{"name": n, "sqnr_db": v} for n, v in [("a", 9.0), ("b", float("inf")), ("c", 3.0)]]
    assert [r["name"] for r in worst_layers(rows, 2)] == ["c", "a"]
