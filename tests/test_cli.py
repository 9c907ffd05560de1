"""The hyq-fx command line on a tiny generated ImageFolder and the bundled checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import hyq_fx
from hyq_fx.artifact import OutputExistsError, atomic_output_dir, load_fit_images
from hyq_fx.cli import main

MODEL = "embedded:mobilevit_xxs.cifar10"


def _folder(root: Path, per_class: int, classes: int = 10, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class{c:02d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    calib = _folder(base / "calib", 1)
    evaluation = _folder(base / "eval", 1, seed=1)
    out = base / "out"
    argv = ["quantize", MODEL, "--calib", str(calib), "--eval", str(evaluation), "--out", str(out),
            "--recipe", "minmax"]  # fmt: skip
    assert main([*argv, "--calib-size", "8", "--no-progress"]) == 0
    return base, out, argv


def test_quantize_writes_report_and_model(quantized):
    _, out, _ = quantized
    report = json.loads((out / "report.json").read_text())
    for key in ("model", "recipe", "w_bits", "a_bits", "fp32_top1", "quant_top1", "n_eval",
                "n_calib", "calib_seconds", "layers"):  # fmt: skip
        assert key in report, key
    assert report["n_calib"] == 8 and report["n_eval"] == 10
    assert len(report["layers"]) == 90
    layer = report["layers"][0]
    assert {"name", "w_bits", "a_bits", "granularity", "scheme", "sqnr_db"} <= set(layer)
    assert not list(out.parent.glob(".out.partial-*"))  # the staging dir was renamed


def test_saved_model_loads_with_identical_outputs(quantized):
    _, out, _ = quantized
    a, b = hyq_fx.load(out), hyq_fx.load(out)
    x = torch.randn(3, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert a.meta["hyq"]["recipe"]["name"] == "minmax"


def test_eval_of_the_saved_model_matches_the_report(quantized, capsys):
    base, out, _ = quantized
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(base / "eval"), "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    report = json.loads((out / "report.json").read_text())
    assert result["n"] == 10
    assert result["top1"] == report["quant_top1"]


def test_existing_output_is_not_overwritten_without_flag(quantized, capsys):
    _, out, argv = quantized
    before = (out / "report.json").read_text()
    assert main([*argv, "--calib-size", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert (out / "report.json").read_text() == before


def test_interrupted_run_leaves_no_output(tmp_path):
    out = tmp_path / "result"
    with pytest.raises(KeyboardInterrupt), atomic_output_dir(out) as staging:
        (staging / "graph.json").write_text("{}")
        raise KeyboardInterrupt
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    with pytest.raises(OutputExistsError), atomic_output_dir(out):
        pass


def test_bad_input_prints_one_clear_line(tmp_path, capsys):
    assert main(["quantize", MODEL, "--calib", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "o")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.startswith("hyq-fx quantize: error:") and "Traceback" not in err
    assert main(["quantize", MODEL, "--calib", str(tmp_path), "--recipe", "nope", "--out",
                 str(tmp_path / "o")]) == 2  # fmt: skip
    assert "unknown recipe 'nope'" in capsys.readouterr().err
    assert main(["eval", "no_such_model_xyz", "--data", str(tmp_path)]) == 2
    assert "no_such_model_xyz" in capsys.readouterr().err


def test_recipes_lists_every_recipe(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in hyq_fx.RECIPES:
        assert name in out
    assert main(["recipes", "--json"]) == 0
    assert {r["name"] for r in json.loads(capsys.readouterr().out)} == set(hyq_fx.RECIPES)


def test_inspect_reports_norms_and_transitions(tmp_path, capsys):
    dot = tmp_path / "g.dot"
    assert main(["inspect", MODEL, "--dot", str(dot)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["norms"]["batchnorm"]["count"] > 0
    assert summary["norms"]["layernorm_tokens"]["count"] == 21
    assert len(summary["transitions"]) == 6  # 3 MobileViT blocks: in and out
    assert dot.read_text().startswith("digraph")


def test_demo_runs_data_free_and_saves(tmp_path, capsys):
    """`hyq-fx demo` end to end on the bundled checkpoint (one synthesis step, to stay fast)."""
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "1", "--no-progress", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "embedded:mobilevit_xxs.cifar10"
    assert 0.0 <= result["top1_agreement"] <= 100.0 and result["logit_sqnr_db"] > 10.0
    assert "--data" in result["real_top1"] or "--eval" in result["real_top1"]
    loaded = hyq_fx.load(out)
    assert sum(isinstance(m, torch.nn.Module) for m in loaded.modules()) > 1


def test_export_onnxruntime_is_requantized_with_contrib_ops_by_default(quantized, capsys):
    base, out, _ = quantized
    capsys.readouterr()
    argv = ["export", str(out), "--to", "onnxruntime", "--calib", str(base / "calib")]
    assert main(argv) == 0
    path = Path(json.loads(capsys.readouterr().out)["out"])
    model = onnx.load(path)
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    assert ("com.microsoft", "QuickGelu") in ops and ("", "Sigmoid") not in ops
    report = json.loads(next(p.value for p in model.metadata_props if p.key == "hyq_export"))
    assert len(report["requantized"]) >= 25
    # without --calib the grids are fitted on the calibration images quantize kept in OUT
    assert load_fit_images(out).shape == (8, 3, 128, 128)
    assert main(["export", str(out), "--to", "onnxruntime"]) == 0
    kept = json.loads(capsys.readouterr().out)
    again = onnx.load(kept["out"])
    again_report = json.loads(next(p.value for p in again.metadata_props if p.key == "hyq_export"))
    assert len(again_report["requantized"]) >= 25
    capsys.readouterr()
    assert main([*argv, "--max-added-error", "-1"]) != 0  # a clear error, no traceback
    assert "max_added_error" in capsys.readouterr().err
