"""Model loading (timm names, local dirs, the embedded asset) and the image-folder data path."""

from __future__ import annotations

import json
import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from hyq_fx.data import (
    DataError,
    EvalTransform,
    evaluate_top1,
    image_folder,
    make_loader,
    preprocess_config,
)
from hyq_fx.models import EMBEDDED_DEFAULT, ModelLoadError, load_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CHECKPOINTS = SHARED / "checkpoints"
EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "hyq_fx" / "assets" / "mobilevit_xxs.cifar10"
CIFAR_INFO = {
    "pretrained_cfg": {
        "input_size": [3, 128, 128],
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],
    }
}


def _need_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path


# ----------------------------------------------------------------------------------- models


def _check_cifar_model(model: torch.nn.Module, info: dict) -> None:
    assert not model.training
    assert info["num_classes"] == 10
    assert info["pretrained_cfg"]["input_size"] == [3, 128, 128]
    assert info["pretrained_cfg"]["mean"] == [0.0, 0.0, 0.0]
    assert info["label_names"][0] == "airplane" and len(info["label_names"]) == 10
    assert json.loads(json.dumps(info)) == info  # JSON-able, unchanged by a round trip
    assert tuple(model.pretrained_cfg["input_size"]) == (3, 128, 128)
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 128, 128))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_load_embedded() -> None:
    model, info = load_model(EMBEDDED_DEFAULT)
    assert info["source"] == EMBEDDED_DEFAULT
    assert info["architecture"] == "mobilevit_xxs"
    _check_cifar_model(model, info)


@pytest.mark.parametrize("name", ["mobilevit_xxs", "mobilevitv2_050"])
@pytest.mark.parametrize("prefix", ["local-dir:", ""])
def test_load_shared_checkpoints(name: str, prefix: str) -> None:
    path = _need_shared(CHECKPOINTS / f"{name}.cifar10")
    model, info = load_model(f"{prefix}{path}")
    assert info["architecture"] == name
    _check_cifar_model(model, info)
    # the weights really are the file's
    state = load_file(str(path / "model.safetensors"))
    key = next(iter(state))
    assert torch.equal(model.state_dict()[key], state[key])


def test_timm_name_random_weights() -> None:
    model, info = load_model("mobilevit_xxs", pretrained=False, num_classes=7)
    assert not model.training
    assert info["num_classes"] == 7 and info["model_args"] == {"num_classes": 7}
    assert info["pretrained_cfg"]["input_size"] == [3, 256, 256]


def test_timm_name_pretrained_is_offline_error() -> None:
    with pytest.raises(ModelLoadError, match="offline.*local-dir:.*pretrained=False"):
        load_model("mobilevit_xxs")


def test_unknown_name_suggests() -> None:
    with pytest.raises(ModelLoadError, match="Did you mean: mobilevit_xxs"):
        load_model("mobilevit_xxx", pretrained=False)


def test_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(f"local-dir:{tmp_path / 'nope'}")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def _copy_embedded(tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(EMBEDDED_DIR, dst)
    return dst


def test_missing_and_malformed_config(tmp_path: Path) -> None:
    d = _copy_embedded(tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="No config.json"):
        load_model(f"local-dir:{d}")
    (d / "config.json").write_text('{"architecture": "mobilevit_xxs",\n  "num_classes": 10,,}')
    with pytest.raises(ModelLoadError, match=r"Malformed .*line 2, column"):
        load_model(f"local-dir:{d}")
    (d / "config.json").write_text('{"num_classes": 10}')
    with pytest.raises(ModelLoadError, match='no "architecture"'):
        load_model(f"local-dir:{d}")


def test_missing_weights(tmp_path: Path) -> None:
    d = _copy_embedded(tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="No model.safetensors"):
        load_model(str(d))
    model, info = load_model(str(d), pretrained=False)  # architecture only
    assert info["num_classes"] == 10


def test_weights_missing_key_and_wrong_shape(tmp_path: Path) -> None:
    d = _copy_embedded(tmp_path)
    state = load_file(str(d / "model.safetensors"))
    state.pop("head.fc.bias")
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"(?s)1 missing.*missing: head\.fc\.bias"):
        load_model(str(d))

    state = load_file(str(EMBEDDED_DIR / "model.safetensors"))
    state["head.fc.weight"] = torch.zeros(5, state["head.fc.weight"].shape[1])
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError) as exc:
        load_model(str(d))
    msg = str(exc.value)
    assert "head.fc.weight: file (5, 320) vs model (10, 320)" in msg
    assert "unexpected: extra.weight" in msg

    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="Could not read"):
        load_model(str(d))


# ------------------------------------------------------------------------------------- data


def test_preprocess_config_defaults() -> None:
    cfg = preprocess_config({})
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875
    assert cfg["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert preprocess_config(CIFAR_INFO)["crop_pct"] == 1.0
    assert preprocess_config(CIFAR_INFO["pretrained_cfg"])["input_size"] == (3, 128, 128)


def test_cifar_transform_equals_plain_interpolate() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    out = EvalTransform(CIFAR_INFO)(Image.fromarray(arr))
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255
    ref = F.interpolate(x, size=128, mode="bilinear", align_corners=False)[0]
    assert out.shape == (3, 128, 128)
    assert (out - ref).abs().max().item() < 1e-5


def test_transform_resize_crop_normalise() -> None:
    info = {"pretrained_cfg": {"input_size": [3, 224, 224], "crop_pct": 0.875}}
    t = EvalTransform(info)
    img = Image.new("RGB", (512, 300), (255, 0, 128))
    out = t(img)
    assert out.shape == (3, 224, 224)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    ref = (torch.tensor([1.0, 0.0, 128 / 255]).view(3, 1, 1) - mean) / std
    assert torch.allclose(out, ref.expand_as(out), atol=1e-4)
    assert t._scaled_size(300, 512) == (256, 436)  # short side floor(224 / 0.875)


def _write_folder(root: Path, per_class: dict[str, int], size: int = 32) -> None:
    rng = np.random.default_rng(0)
    for cls, n in per_class.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i:03d}.png")


def test_image_folder_and_balanced_limit(tmp_path: Path) -> None:
    _write_folder(tmp_path, {"b": 6, "a": 3, "c": 5})
    ds = image_folder(tmp_path, CIFAR_INFO)
    assert ds.classes == ["a", "b", "c"] and len(ds) == 14
    x, y = ds[0]
    assert x.shape == (3, 128, 128) and y == 0

    sub = image_folder(tmp_path, CIFAR_INFO, limit=7)
    counts = Counter(sub.targets)
    assert len(sub) == 7 and max(counts.values()) - min(counts.values()) <= 1
    assert sub.samples == image_folder(tmp_path, CIFAR_INFO, limit=7).samples  # deterministic
    assert sub.samples == sorted(sub.samples, key=lambda s: (s[1], s[0]))
    other = image_folder(tmp_path, CIFAR_INFO, limit=7, seed=1)
    assert Counter(other.targets) == counts or len(other) == 7

    big = image_folder(tmp_path, CIFAR_INFO, limit=12)  # "a" runs out after 3
    assert Counter(big.targets) == {0: 3, 1: 5, 2: 4} or Counter(big.targets) == {0: 3, 1: 4, 2: 5}
    assert len(image_folder(tmp_path, CIFAR_INFO, limit=100)) == 14


def test_corrupt_image_skipped_with_warning(tmp_path: Path) -> None:
    _write_folder(tmp_path, {"a": 2, "b": 2})
    bad = tmp_path / "b" / "zz_bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.warns(UserWarning, match=r"Skipped 1 unreadable image.*zz_bad\.jpg"):
        ds = image_folder(tmp_path, CIFAR_INFO)
    assert len(ds) == 4 and str(bad) in ds.skipped
    with pytest.warns(UserWarning, match="Skipped 1"):
        sub = image_folder(tmp_path, CIFAR_INFO, limit=4)
    assert len(sub) == 4


def test_truncated_image_replaced_lazily(tmp_path: Path) -> None:
    _write_folder(tmp_path, {"a": 3})
    path = tmp_path / "a" / "001.png"
    good = path.read_bytes()
    ds = image_folder(tmp_path, CIFAR_INFO)
    path.write_bytes(good[: len(good) // 2])  # breaks after the up-front check
    with pytest.warns(UserWarning, match="Skipping unreadable image"):
        x, y = ds[1]
    assert x.shape == (3, 128, 128) and y == 0 and str(path) in ds.skipped


def test_grayscale_rgba_palette_to_rgb(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    Image.new("L", (20, 30), 200).save(tmp_path / "a" / "gray.png")
    Image.new("RGBA", (30, 20), (10, 20, 30, 0)).save(tmp_path / "a" / "rgba.png")
    Image.new("RGB", (16, 16), (1, 2, 3)).convert("P").save(tmp_path / "a" / "pal.png")
    Image.new("I;16", (16, 16), 65535).save(tmp_path / "a" / "deep.png")
    ds = image_folder(tmp_path, CIFAR_INFO)
    xs = {Path(p).stem: ds[i][0] for i, (p, _) in enumerate(ds.samples)}
    assert all(x.shape == (3, 128, 128) for x in xs.values())
    assert torch.allclose(xs["gray"], torch.full((3, 128, 128), 200 / 255), atol=1e-5)
    assert torch.allclose(xs["rgba"][:, 64, 64], torch.tensor([10, 20, 30]) / 255, atol=1e-5)
    assert torch.allclose(xs["deep"], torch.ones(3, 128, 128), atol=1e-5)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        image_folder(tmp_path / "missing", CIFAR_INFO)
    with pytest.raises(DataError, match=r"no class subfolders.*<root>/<class>/<image>\.jpg"):
        image_folder(tmp_path, CIFAR_INFO)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="no images"):
        image_folder(tmp_path, CIFAR_INFO)
    (tmp_path / "a" / "x.jpg").write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="None of the 1 image files"):
            image_folder(tmp_path, CIFAR_INFO)


def test_class_count_mismatch(tmp_path: Path) -> None:
    _write_folder(tmp_path, {"a": 1, "b": 1, "c": 1})
    with pytest.raises(DataError, match=r"has 3 class folders but the model expects 10"):
        image_folder(tmp_path, CIFAR_INFO, expected_classes=10)
    assert len(image_folder(tmp_path, CIFAR_INFO, expected_classes=3)) == 3


def test_evaluate_top1(tmp_path: Path) -> None:
    _write_folder(tmp_path, {"a": 3, "b": 2}, size=8)
    ds = image_folder(tmp_path, CIFAR_INFO)

    def always_b(x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[0.0, 1.0]]).repeat(x.shape[0], 1)

    res = evaluate_top1(always_b, make_loader(ds, batch_size=2), progress=False)
    assert res == {"top1": pytest.approx(0.4), "n": 5, "predictions": [1, 1, 1, 1, 1]}


def test_shared_calib_with_embedded_model() -> None:
    root = _need_shared(SHARED / "data" / "cifar10" / "calib")
    model, info = load_model(EMBEDDED_DEFAULT)
    ds = image_folder(root, info, limit=40, expected_classes=info["num_classes"])
    assert Counter(ds.targets) == dict.fromkeys(range(10), 4)
    res = evaluate_top1(model, make_loader(ds, batch_size=40), progress=False)
    assert res["n"] == 40 and res["top1"] >= 0.6
