"""Round trips of captured GraphModules through graph.json + model.safetensors."""

from __future__ import annotations

import json
import operator
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import fx, nn

from hyq_fx import QuantSpec, capture
from hyq_fx.quantizer import FakeQuantizer
from hyq_fx.serialize import SerializationError, load_graph_module, save_graph_module


def _node_list(gm: fx.GraphModule) -> list[tuple]:
    return [(n.name, n.op, str(n.target), str(n.args), str(n.kwargs)) for n in gm.graph.nodes]


def _no_pickle(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == ["graph.json", "model.safetensors"]
    assert not [p for p in out.rglob("*") if p.suffix in (".pt", ".pth", ".pkl", ".bin")]


def _small_graph() -> tuple[fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    x = torch.randn(2, 3, 16, 16)
    return capture(model, x), x


@pytest.mark.parametrize("name", ["mobilevit_xxs", "mobilevitv2_050"])
def test_timm_round_trip(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)  # 128x128 works too; 64 keeps the test fast on CPU
    gm = capture(timm.create_model(name, num_classes=10), x)
    save_graph_module(gm, tmp_path, metadata={"model": name, "bits": 8})
    _no_pickle(tmp_path)

    loaded, metadata = load_graph_module(tmp_path)
    assert metadata == {"model": name, "bits": 8}
    assert not loaded.training
    assert _node_list(loaded) == _node_list(gm)
    for a, b in zip(gm.graph.nodes, loaded.graph.nodes, strict=True):
        assert a.target is b.target or a.target == b.target
        assert b.meta["hyq_module_path"] == a.meta["hyq_module_path"]
        assert b.meta["hyq_module_type"] == a.meta["hyq_module_type"]
    assert gm.state_dict().keys() == loaded.state_dict().keys()
    params = {n for n, _ in gm.named_parameters()}
    assert params == {n for n, _ in loaded.named_parameters()}
    with torch.no_grad():
        assert torch.equal(gm(x), loaded(x))


def test_fake_quantizer_and_folded_tensor_round_trip(tmp_path: Path) -> None:
    gm, x = _small_graph()
    fq = FakeQuantizer(QuantSpec(bits=8, symmetric=False), observer="minmax")
    fq(x)  # observe mode
    fq.calibrate()
    gm.add_module("fq_x", fq)
    gm.register_buffer("folded_bias", torch.randn(8, 1, 1))
    graph = gm.graph
    placeholder = next(n for n in graph.nodes if n.op == "placeholder")
    output = graph.output_node()
    with graph.inserting_after(placeholder):
        quant = graph.call_module("fq_x", (placeholder,))
    placeholder.replace_all_uses_with(quant, delete_user_cb=lambda user: user is not quant)
    with graph.inserting_before(output):
        bias = graph.get_attr("folded_bias")
        shifted = graph.call_function(torch.ops.aten.add.Tensor, (output.args[0], bias), {})
    output.args = (shifted,)
    gm.recompile()

    save_graph_module(gm, tmp_path)
    _no_pickle(tmp_path)
    loaded, metadata = load_graph_module(tmp_path)
    assert metadata == {}
    assert isinstance(loaded.fq_x, FakeQuantizer)
    assert loaded.fq_x.config() == fq.config() and loaded.fq_x.mode == "quantize"
    assert torch.equal(loaded.fq_x.scale, fq.scale)
    assert torch.equal(loaded.fq_x.zero_point, fq.zero_point)
    assert _node_list(loaded) == _node_list(gm)
    with torch.no_grad():
        assert torch.equal(gm(x), loaded(x))
        assert not torch.equal(loaded(x), gm(x.clone().fill_(0)))


def test_shared_storage_is_saved(tmp_path: Path) -> None:
    gm, x = _small_graph()
    gm.register_buffer("view_a", gm.state_dict()["0.weight"].view(-1)[:5])
    save_graph_module(gm, tmp_path)
    loaded, _ = load_graph_module(tmp_path)
    assert torch.equal(loaded.view_a, gm.view_a)
    assert torch.equal(gm(x), loaded(x))


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(SerializationError, match="no saved model directory"):
        load_graph_module(tmp_path / "nowhere")
    gm, _ = _small_graph()
    save_graph_module(gm, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(SerializationError, match=r"model\.safetensors.*hyq-fx quantize --out"):
        load_graph_module(tmp_path)


def test_unknown_target_and_version(tmp_path: Path) -> None:
    gm, _ = _small_graph()
    save_graph_module(gm, tmp_path)
    path = tmp_path / "graph.json"
    data = json.loads(path.read_text())
    node = next(n for n in data["nodes"] if n["op"] == "call_function")
    for bad in ("aten.no_such_op.default", "os.system", "builtins.eval", "operator.call"):
        node["target"] = bad
        path.write_text(json.dumps(data))
        with pytest.raises(SerializationError, match=f"target '{bad}' is not allowed"):
            load_graph_module(tmp_path)
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(SerializationError, match="format version 99"):
        load_graph_module(tmp_path)


def test_missing_and_mismatched_tensors(tmp_path: Path) -> None:
    gm, _ = _small_graph()
    save_graph_module(gm, tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["0.weight"]
    tensors["0.bias"] = torch.zeros(3)
    save_file(tensors, str(path))
    with pytest.raises(SerializationError, match=r"missing: 0\.weight.*0\.bias: expected \[8\]"):
        load_graph_module(tmp_path)


def test_unsupported_values_are_refused(tmp_path: Path) -> None:
    gm, _ = _small_graph()
    gm.add_module("other", nn.ReLU())
    output = gm.graph.output_node()
    with gm.graph.inserting_before(output):
        relu = gm.graph.call_module("other", (output.args[0],))
    output.args = (relu,)
    with pytest.raises(SerializationError, match="'other'.*only FakeQuantizer"):
        save_graph_module(gm, tmp_path)

    gm, _ = _small_graph()
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    node.kwargs = {"weird": object()}
    with pytest.raises(SerializationError, match=f"node '{node.name}'.*builtins.object"):
        save_graph_module(gm, tmp_path)


def test_argument_encoding(tmp_path: Path) -> None:
    graph = fx.Graph()
    x = graph.placeholder("x")
    aten = torch.ops.aten
    wide = graph.call_function(aten._to_copy.default, (x,), {"dtype": torch.float64})
    part = graph.call_function(operator.getitem, (wide, (slice(0, 1, None), 0)))
    same = graph.call_function(
        aten.clone.default, (part,), {"memory_format": torch.contiguous_format}
    )
    zeros = graph.call_function(
        aten.zeros.default,
        ([3],),
        {"dtype": torch.float64, "layout": torch.strided, "device": torch.device("cpu")},
    )
    total = graph.call_function(aten.add.Tensor, (same, zeros), {"alpha": 0.5})
    graph.output((total, [same, -float("inf")]))
    gm = fx.GraphModule(nn.Module(), graph)

    save_graph_module(gm, tmp_path)
    loaded, _ = load_graph_module(tmp_path)
    assert _node_list(loaded) == _node_list(gm)
    out = loaded.graph.output_node().args[0]
    assert isinstance(out, tuple) and isinstance(out[1], list)
    x_in = torch.randn(2, 3, 3)
    (a, (b, c)), (d, (e, f)) = gm(x_in), loaded(x_in)
    assert torch.equal(a, d) and torch.equal(b, e) and c == f == -float("inf")
