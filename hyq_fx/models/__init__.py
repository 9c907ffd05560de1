"""Load vision models offline: timm architectures, local checkpoint dirs and the bundled demo.

A *spec* string names the model:

* ``embedded:mobilevit_xxs.cifar10`` — the checkpoint bundled in ``hyq_fx/assets``;
* ``local-dir:PATH`` or a plain directory ``PATH`` — timm's local-dir format, a folder with
  ``config.json`` (``architecture``, ``num_classes``, ``model_args``, ``pretrained_cfg``,
  optionally ``label_names``) and ``model.safetensors``;
* a timm model name (``mobilevit_xxs``, ``resnet50.a1_in1k``) — random weights only
  (``pretrained=False``): these machines cannot download from the Hugging Face hub.

Weights are read with ``safetensors`` only; nothing is ever unpickled.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

EMBEDDED_DEFAULT = "embedded:mobilevit_xxs.cifar10"
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_CFG_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
_SHOW = 10


class ModelLoadError(ValueError):
    """A model spec could not be resolved or loaded; the message says what, where and the fix."""


def _jsonable(value: Any) -> Any:
    """Tuples → lists, recursively, so the info dict survives ``json.dumps`` unchanged."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _preprocess_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: _jsonable(cfg[k]) for k in _CFG_KEYS if k in cfg}


def _embedded_names() -> list[str]:
    if not ASSETS_DIR.is_dir():
        return []
    return sorted(p.name for p in ASSETS_DIR.iterdir() if (p / CONFIG_NAME).is_file())


def _unknown_name_error(name: str) -> ModelLoadError:
    base = name.split(".", 1)[0]
    close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ModelLoadError(
        f"Unknown model {name!r}: it is not a timm architecture (timm {timm.__version__}) nor an "
        f"existing directory.{hint} Use a name from timm.list_models(), 'local-dir:PATH' for a "
        f"folder with {CONFIG_NAME} + {WEIGHTS_NAME}, or {EMBEDDED_DEFAULT!r}."
    )


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ModelLoadError(
            f"No {CONFIG_NAME} in {directory}: a model directory needs {CONFIG_NAME} (with at "
            f'least "architecture") next to {WEIGHTS_NAME}, as written by timm / huggingface_hub.'
        )
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(
            f"Malformed {path}: {exc.msg} at line {exc.lineno}, column {exc.colno} "
            f"(char {exc.pos}). Fix the JSON syntax of the file."
        ) from exc
    if not isinstance(config, dict):
        raise ModelLoadError(
            f"Malformed {path}: expected a JSON object, got {type(config).__name__}."
        )
    arch = config.get("architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelLoadError(
            f'{path} has no "architecture" key (a timm model name such as "mobilevit_xxs"); '
            f"add it so the model can be built. Keys present: {sorted(config)}."
        )
    for key in ("model_args", "pretrained_cfg"):
        if key in config and not isinstance(config[key], dict):
            raise ModelLoadError(f'{path}: "{key}" must be a JSON object, got {config[key]!r}.')
    return config


def _check_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], weights: Path, arch: str
) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        return
    found = []
    for title, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("shape-mismatched", mismatched),
    ):
        if keys:
            more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
            found.append(f"{title}: {', '.join(keys[:_SHOW])}{more}")
    raise ModelLoadError(  # one line: the CLI prints it as `hyq-fx CMD: error: ...`
        f"The weights in {weights} do not match architecture {arch!r} "
        f"({len(missing)} missing, {len(unexpected)} unexpected, "
        f"{len(mismatched)} shape-mismatched keys): {'; '.join(found)}. "
        'Fix: make "architecture", "num_classes" and "model_args" in config.json match the '
        "checkpoint (e.g. img_size, num_classes), or use the checkpoint it was saved from."
    )


def _load_dir(
    directory: Path, source: str, pretrained: bool, kwargs: dict[str, Any]
) -> tuple[nn.Module, dict[str, Any]]:
    if not directory.exists():
        raise ModelLoadError(
            f"Model directory {directory} does not exist (from spec {source!r}). Pass an existing "
            f"folder holding {CONFIG_NAME} + {WEIGHTS_NAME}, e.g. 'local-dir:../shared/"
            f"checkpoints/mobilevit_xxs.cifar10'."
        )
    if not directory.is_dir():
        raise ModelLoadError(
            f"{directory} is a file, not a directory (from spec {source!r}); point at the folder "
            f"holding {CONFIG_NAME} + {WEIGHTS_NAME}."
        )
    config = _read_config(directory)
    arch = config["architecture"]
    if not timm.is_model(arch):
        err = _unknown_name_error(arch)
        raise ModelLoadError(f"{directory / CONFIG_NAME}: {err}") from None
    model_args = dict(config.get("model_args") or {})
    model_args.update(kwargs)
    num_classes = model_args.pop("num_classes", config.get("num_classes"))
    weights = directory / WEIGHTS_NAME
    if pretrained and not weights.is_file():
        raise ModelLoadError(
            f"No {WEIGHTS_NAME} in {directory}: the weights must be saved there in safetensors "
            f"format (safetensors.torch.save_file(model.state_dict(), ...)); .bin/.pth pickles are "
            f"not loaded. Pass pretrained=False for random weights."
        )
    create_args = dict(model_args)
    if num_classes is not None:
        create_args["num_classes"] = int(num_classes)
    try:
        model = timm.create_model(arch, pretrained=False, **create_args)
    except Exception as exc:  # re-raised with the context added
        raise ModelLoadError(
            f"timm.create_model({arch!r}, **{create_args!r}) failed for {directory}: {exc}. "
            f'Check "model_args" in {CONFIG_NAME}.'
        ) from exc
    if pretrained:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(
                f"Could not read {weights}: {exc}. The file is not a valid safetensors file "
                f"(truncated download or wrong format?)."
            ) from exc
        _check_state_dict(model, state, weights, arch)
        model.load_state_dict(state, strict=True)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update(config.get("pretrained_cfg") or {})
    model.pretrained_cfg = cfg
    model.default_cfg = cfg
    model.eval()
    info: dict[str, Any] = {
        "source": source,
        "architecture": arch,
        "num_classes": int(getattr(model, "num_classes", num_classes or 0)),
        "model_args": _jsonable(model_args),
        "pretrained_cfg": _preprocess_cfg(cfg),
        "pretrained": pretrained,
        "path": str(directory.resolve()),
    }
    if isinstance(config.get("label_names"), list):
        info["label_names"] = [str(x) for x in config["label_names"]]
    return model, info


def _load_timm(name: str, pretrained: bool, kwargs: dict[str, Any]) -> tuple[nn.Module, dict]:
    hub = name.startswith(("hf-hub:", "hf_hub:", "timm/"))
    if not hub and not timm.is_model(name):
        raise _unknown_name_error(name)
    if hub or pretrained:
        raise ModelLoadError(
            f"Cannot load pretrained weights for {name!r}: that would download them from the "
            f"Hugging Face hub, and this machine is offline. Use 'local-dir:PATH' (a folder with "
            f"{CONFIG_NAME} + {WEIGHTS_NAME}), {EMBEDDED_DEFAULT!r}, or pretrained=False for "
            f"random weights."
        )
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    info: dict[str, Any] = {
        "source": name,
        "architecture": name.split(".", 1)[0],
        "num_classes": int(getattr(model, "num_classes", 0)),
        "model_args": _jsonable(kwargs),
        "pretrained_cfg": _preprocess_cfg(cfg),
        "pretrained": False,
    }
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if subset:
            info["label_names"] = list(ImageNetInfo(subset).label_names())
    except Exception:  # label names are optional metadata
        pass
    return model, info


def load_model(
    spec: str, *, pretrained: bool = True, **kwargs: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model named by ``spec`` in eval mode and return ``(model, model_info)``.

    ``spec``: ``embedded:NAME`` (bundled asset), ``local-dir:PATH`` or a directory path
    (``config.json`` + ``model.safetensors``), or a timm model name (only with
    ``pretrained=False`` — no hub downloads offline). ``kwargs`` go to ``timm.create_model``
    (for directories they override ``model_args`` from ``config.json``). ``model_info`` is
    JSON-able: ``source``, ``architecture``, ``num_classes``, ``model_args``, ``pretrained_cfg``
    (input_size, interpolation, crop_pct, crop_mode, mean, std) and ``label_names`` when known.
    Raises :class:`ModelLoadError` with the cause and the fix.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError(f"Model spec must be a non-empty string, got {spec!r}.")
    spec = spec.strip()
    if spec.startswith("embedded:"):
        name = spec[len("embedded:") :]
        available = _embedded_names()
        if name not in available:
            raise ModelLoadError(
                f"No embedded model {name!r}; bundled in {ASSETS_DIR}: {available or 'none'}. "
                f"Use e.g. {EMBEDDED_DEFAULT!r}."
            )
        model, info = _load_dir(ASSETS_DIR / name, spec, pretrained, kwargs)
        info.pop("path", None)
        return model, info
    if spec.startswith("local-dir:"):
        path = Path(spec[len("local-dir:") :]).expanduser()
        return _load_dir(path, spec, pretrained, kwargs)
    path = Path(spec).expanduser()
    looks_like_path = "/" in spec or "\\" in spec or spec.startswith((".", "~"))
    if path.is_dir() or (looks_like_path and not spec.startswith(("hf-hub:", "timm/"))):
        return _load_dir(path, spec, pretrained, kwargs)
    return _load_timm(spec, pretrained, kwargs)


from . import mobile_former  # noqa: E402,F401  (registers mobile_former_* in timm)
