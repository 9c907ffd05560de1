"""Portable ONNX through ``torch.onnx`` (``backends/onnx_export.py``), and a fast subset of the zoo.

Invariants: with every quantizer off the file computes the float graph (SQNR ≥ 80 dB: each op
is translated exactly, up to float rounding); the file holds only standard-domain operators,
int8 / uint8 weight initializers behind DequantizeLinear and a dynamic batch; ONNX Runtime's
logits are within ``MIN_SQNR_DB`` of the fake-quant model at batch 1 and 8 for architectures the
hand-written exporter could not translate (bilinear upsampling, ``aten.zeros``, a class token,
``reshape_as``); the size comes from the quantized graph, and a mismatching input is a clear
error.
"""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from conftest import shared_path
from torch.utils.data import DataLoader

import hyq_fx
from hyq_fx.backends.onnx_export import export_onnx
from hyq_fx.backends.onnx_qdq import ExportError, OnnxRunner
from hyq_fx.cli import main
from hyq_fx.deploy_check import MIN_SQNR_DB, check_deploy, settle_batchnorm
from hyq_fx.models import load_model

# 128x128 variants of architectures whose export needed ops the hand-written table lacked
ZOO_SUBSET = {
    "efficientformerv2_s0": {"img_size": 128},  # aten.upsample_bilinear2d
    "edgenext_xx_small": {},  # aten.zeros
    "deit_tiny_patch16_224": {"img_size": 128},  # a class token expanded to the batch
    "levit_128s": {"img_size": 128},  # aten.reshape_as
}
# the float export (every quantizer off) of these is checked too; benchmarks/zoo.py checks all
FLOAT_CHECKED = ("efficientformerv2_s0", "levit_128s")


def _imagenet_batches(info: dict, size: int) -> list[torch.Tensor]:
    cfg = {**info["pretrained_cfg"], "input_size": [3, size, size], "crop_pct": 1.0}
    from hyq_fx.data import image_folder

    folder = shared_path("data", "imagenet-sample")
    data = image_folder(folder, {**info, "pretrained_cfg": cfg}, limit=40)
    return [x for x, _ in DataLoader(data, batch_size=10)]


@pytest.mark.parametrize("name", list(ZOO_SUBSET))
def test_zoo_architecture_exports_and_matches_fake_quant(name, tmp_path):
    torch.manual_seed(0)
    model, info = load_model(name, pretrained=False, **ZOO_SUBSET[name])
    batches = _imagenet_batches(info, 128)  # 40 images: 20 settle, 10 calibrate, 8 compare
    model = settle_batchnorm(model, batches[:2])
    backends = ("onnx", "onnx_fp32") if name in FLOAT_CHECKED else ("onnx",)
    row = check_deploy(model, batches[2:3], batches[3][:8], tmp_path, backends=backends)
    assert "error" not in row["onnx"], row["onnx"]
    assert row["onnx"]["sqnr_b1_db"] >= MIN_SQNR_DB and row["onnx"]["sqnr_bn_db"] >= MIN_SQNR_DB
    if name in FLOAT_CHECKED:  # every op translated exactly, up to float rounding
        assert row["onnx_fp32"]["sqnr_db"] >= 80


@pytest.fixture(scope="module")
def xxs_quantized(xxs_model, xxs_input):
    """mobilevit_xxs (timm's default 256x256) quantized at 128x128."""
    return hyq_fx.quantize(xxs_model, xxs_input, "minmax", progress=False)


@pytest.fixture(scope="module")
def cli_export(xxs_quantized, tmp_path_factory):
    """``hyq-fx export OUT --to onnx`` of the xxs model quantized at 128x128, whose stored
    preprocessing (timm's default cfg) says another size."""
    _, info = load_model("mobilevit_xxs", pretrained=False, num_classes=10)
    assert info["pretrained_cfg"]["input_size"][1:] != [128, 128]  # timm's default is another
    qgm = hyq_fx.load(hyq_fx.save(xxs_quantized, tmp_path_factory.mktemp("q") / "q"))
    qgm.meta["hyq"]["model_info"] = info
    out = hyq_fx.save(qgm, tmp_path_factory.mktemp("q2") / "q2")
    assert main(["export", str(out), "--to", "onnx"]) == 0
    return out / "model.qdq.onnx"


def test_file_is_standard_qdq_with_integer_weights_and_dynamic_batch(cli_export):
    model = onnx.load(str(cli_export))
    assert {n.domain for n in model.graph.node} == {""}
    kinds = {onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer}
    assert {"INT8", "UINT8"} <= kinds
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert conv_weights and conv_weights <= dequantized  # no float conv weight is stored
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch"
    report = OnnxRunner(cli_export).export_report
    assert report["dynamic_batch"] and report["input_shape"] == [3, 128, 128]


def test_cli_exports_at_the_size_the_model_was_quantized_at(cli_export, xxs_quantized, xxs_input):
    runner = OnnxRunner(cli_export)
    assert runner.model_info["pretrained_cfg"]["input_size"] == [3, 128, 128]
    with torch.no_grad():
        ref = xxs_quantized(xxs_input)
    got = runner(xxs_input)
    noise = (got - ref).pow(2).mean()
    assert 10 * torch.log10(ref.pow(2).mean() / noise) >= MIN_SQNR_DB


def test_mismatching_input_and_ort_flags_are_clear_errors(xxs_quantized, tmp_path, capsys):
    with pytest.raises(ExportError, match=r"quantized at \('N', 3, 128, 128\)"):
        export_onnx(xxs_quantized, tmp_path / "m.onnx", torch.zeros(1, 3, 224, 224))
    out = hyq_fx.save(xxs_quantized, tmp_path / "q")
    capsys.readouterr()
    assert main(["export", str(out), "--to", "onnx", "--requantize", "auto"]) != 0
    err = capsys.readouterr().err
    assert "--to onnxruntime" in err and "Traceback" not in err
    assert not (out / "model.qdq.onnx").exists()
    assert json.loads((out / "graph.json").read_text())  # the artifact is untouched
