"""Image folders, eval preprocessing and top-1 evaluation, in plain torch.

The transform reproduces timm's eval pipeline (resize the short side to
``floor(size / crop_pct)``, center crop, normalise) with ``F.interpolate`` instead of PIL, so
that for the CIFAR-10 checkpoints (32x32 → 128, ``crop_pct`` 1.0) it is exactly the
``F.interpolate(x, 128, mode="bilinear", align_corners=False)`` they were trained with.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VERIFY_MAX_FILES = 20000
_LAYOUT = "<root>/<class>/<image>.jpg (torchvision ImageFolder layout)"
_SHOW = 5


class DataError(ValueError):
    """An image folder is missing, empty or does not fit the model; the message says how to fix."""


class DataWarning(UserWarning):
    """Something in an image folder was skipped (unreadable images); the data is still usable."""


def preprocess_config(model_info_or_pretrained_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Eval preprocessing from a model-info dict (or a bare ``pretrained_cfg``).

    Returns ``input_size`` (C, H, W), ``interpolation``, ``crop_pct``, ``crop_mode``, ``mean``
    and ``std``; absent keys default to 3x224x224, bilinear, 0.875, center and timm's ImageNet
    mean/std.
    """
    src = model_info_or_pretrained_cfg or {}
    cfg = src.get("pretrained_cfg", src) if isinstance(src, Mapping) else {}
    cfg = cfg or {}
    size = cfg.get("input_size") or (3, 224, 224)
    if isinstance(size, int):
        size = (3, size, size)
    size = tuple(int(s) for s in size)
    if len(size) == 2:
        size = (3, *size)
    crop_pct = cfg.get("crop_pct")
    return {
        "input_size": size,
        "interpolation": str(cfg.get("interpolation") or "bilinear"),
        "crop_pct": float(crop_pct) if crop_pct else 0.875,
        "crop_mode": str(cfg.get("crop_mode") or "center"),
        "mean": tuple(float(m) for m in (cfg.get("mean") or IMAGENET_DEFAULT_MEAN)),
        "std": tuple(float(s) for s in (cfg.get("std") or IMAGENET_DEFAULT_STD)),
    }


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, CMYK, I;16, ...) → RGB; an alpha channel is dropped."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


class EvalTransform:
    """PIL image → normalised ``(C, H, W)`` float tensor, timm eval style, in plain torch.

    RGB, ``/255``, resize the short side to ``floor(size / crop_pct)`` with
    ``F.interpolate(mode, align_corners=False, antialias=True)`` (``crop_mode="squash"``
    resizes both sides to it), center crop to ``input_size``, ``(x - mean) / std``.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        cfg = preprocess_config(config)
        self.input_size: tuple[int, int, int] = cfg["input_size"]
        interp = cfg["interpolation"].lower()
        self.mode = interp if interp in ("bilinear", "bicubic") else "bilinear"
        self.crop_pct: float = cfg["crop_pct"]
        self.crop_mode: str = cfg["crop_mode"]
        self.mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(cfg["std"], dtype=torch.float32).view(-1, 1, 1)

    def _scaled_size(self, h: int, w: int) -> tuple[int, int]:
        th, tw = self.input_size[1:]
        sh, sw = math.floor(th / self.crop_pct), math.floor(tw / self.crop_pct)
        if self.crop_mode == "squash":
            return sh, sw
        if sh == sw:  # torchvision Resize(int): short side = s, long side truncated
            s = sh
            if h <= w:
                return s, max(s, int(s * w / h))
            return max(s, int(s * h / w)), s
        scale = max(sh / h, sw / w)  # timm ResizeKeepRatio: both sides at least the target
        return max(sh, round(h * scale)), max(sw, round(w * scale))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = _to_rgb(img)
        x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)
        x = x.unsqueeze(0).float().div_(255.0)
        h, w = x.shape[-2:]
        nh, nw = self._scaled_size(h, w)
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode=self.mode, align_corners=False, antialias=True)
            if self.mode == "bicubic":
                x = x.clamp_(0.0, 1.0)  # PIL's uint8 output clips the overshoot too
        th, tw = self.input_size[1:]
        if nh < th or nw < tw:  # crop larger than the image: pad with zeros like CenterCrop
            ph, pw = max(th - nh, 0), max(tw - nw, 0)
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
            nh, nw = x.shape[-2:]
        top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
        x = x[0, :, top : top + th, left : left + tw]
        return (x - self.mean) / self.std

    def __repr__(self) -> str:
        return (
            f"EvalTransform(input_size={self.input_size}, mode={self.mode!r}, "
            f"crop_pct={self.crop_pct}, crop_mode={self.crop_mode!r}, "
            f"mean={tuple(self.mean.flatten().tolist())}, std={tuple(self.std.flatten().tolist())})"
        )


def make_transform(model_info: Mapping[str, Any]) -> EvalTransform:
    """The eval transform for a model-info dict / ``pretrained_cfg``."""
    return EvalTransform(model_info)


def _readable(path: str) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # any decoder error means "skip this file"
        return False


class ImageFolderDataset(Dataset):
    """``(image, class_index)`` pairs from an ImageFolder tree; unreadable files are skipped.

    Attributes: ``root``, ``classes`` (sorted folder names), ``class_to_idx``, ``samples``
    (``(path, index)``), ``targets``, ``skipped`` (paths of unreadable files found so far).
    """

    def __init__(
        self,
        root: Path,
        classes: list[str],
        samples: list[tuple[str, int]],
        transform: Callable[[Image.Image], torch.Tensor],
        skipped: list[str],
    ) -> None:
        self.root = root
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.samples = samples
        self.targets = [t for _, t in samples]
        self.transform = transform
        self.skipped = skipped
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> Image.Image:
        path = self.samples[index][0]
        with Image.open(path) as im:
            im.load()
            return im.copy()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.samples)
        label = self.samples[index][1]
        # Lazily found unreadable files (truncated data that passed verify(), or folders too big
        # to verify up front) are replaced by the next readable image of the same class.
        for i in ((index + k) % n for k in range(n)):
            if i in self._bad or self.samples[i][1] != label:
                continue
            try:
                img = self._load(i)
            except Exception:  # any decoder error: skip
                self._bad.add(i)
                path = self.samples[i][0]
                self.skipped.append(path)
                warnings.warn(
                    f"Skipping unreadable image {path} (replaced by the next readable image of "
                    f"class {self.classes[label]!r}).",
                    DataWarning,
                    stacklevel=2,
                )
                continue
            return self.transform(img), label
        raise DataError(f"No readable image of class {self.classes[label]!r} in {self.root}.")

    def __repr__(self) -> str:
        return (
            f"ImageFolderDataset(root={str(self.root)!r}, classes={len(self.classes)}, "
            f"images={len(self)}, skipped={len(self.skipped)})"
        )


def _scan(root: Path) -> tuple[list[str], list[list[str]]]:
    """Sorted class folders and, per class, its image files in ImageFolder's order."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    files: list[list[str]] = []
    for c in classes:
        found = []
        for dirpath, _, fnames in sorted(os.walk(root / c, followlinks=True)):
            for f in sorted(fnames):
                if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith("."):
                    found.append(os.path.join(dirpath, f))
        files.append(found)
    return classes, files


def _balanced_pick(
    files: list[list[str]], limit: int, seed: int, verify: bool
) -> tuple[list[tuple[str, int]], list[str]]:
    """Round-robin over classes (seeded order per round) taking seeded-shuffled files."""
    rng = random.Random(seed)
    queues = []
    for per_class in files:
        idx = list(range(len(per_class)))
        rng.shuffle(idx)
        queues.append(idx)
    pos = [0] * len(files)
    chosen: list[tuple[int, int]] = []
    bad: list[str] = []
    active = [c for c in range(len(files)) if files[c]]
    while len(chosen) < limit and active:
        order = active[:]
        rng.shuffle(order)
        for c in order:
            if len(chosen) >= limit:
                break
            while pos[c] < len(queues[c]):
                i = queues[c][pos[c]]
                pos[c] += 1
                if not verify or _readable(files[c][i]):
                    chosen.append((c, i))
                    break
                bad.append(files[c][i])
        active = [c for c in active if pos[c] < len(queues[c])]
    chosen.sort()
    return [(files[c][i], c) for c, i in chosen], bad


def _check_labels(root: Path, classes: list[str], labels: list[str]) -> None:
    """Folders named by the model's labels must be exactly those labels, in the model's order.

    The class index of an image is its folder's position in sorted order, so a folder set named
    like the labels but ordered or spelled differently would silently score the wrong classes.
    Folders that share no name with the labels (ImageNet wnids vs. label texts, ``class00``...)
    cannot be compared and are left to the class-count check.
    """
    if classes == labels or not set(classes) & set(labels):
        return
    extra = [c for c in classes if c not in labels]
    missing = [c for c in labels if c not in classes]
    if extra or missing:
        detail = (
            f"not among the model's labels: {_names(extra)}; labels without a folder: "
            f"{_names(missing)}"
        )
    else:
        i = next(i for i, (c, lab) in enumerate(zip(classes, labels, strict=True)) if c != lab)
        detail = (
            f"same names in another order: sorted folder {i} is {classes[i]!r} but the model's "
            f"class {i} is {labels[i]!r}"
        )
    raise DataError(
        f"The class folders of {root} do not match the model's labels ({detail}). Labels come "
        f"from the sorted folder order, so top-1 would be measured against the wrong classes; "
        f"rename the folders so that, sorted, they are the model's classes in order "
        f"({_names(labels)}), or use the dataset the model was trained on."
    )


def _names(names: list[str]) -> str:
    return (", ".join(names[:_SHOW]) + (", ..." if len(names) > _SHOW else "")) or "none"


def image_folder(
    root: str | os.PathLike[str],
    model_info: Mapping[str, Any],
    *,
    limit: int | None = None,
    seed: int = 0,
    expected_classes: int | None = None,
    expected_labels: Sequence[str] | None = None,
) -> ImageFolderDataset:
    """An ImageFolder dataset (``<root>/<class>/<image>``, index = sorted folder order).

    Images go through :class:`EvalTransform` built from ``model_info``. ``limit`` keeps a
    class-balanced subset (per-class counts differ by at most one where classes have enough
    images), chosen deterministically from ``seed``. Unreadable images are skipped with a
    warning: checked up front (``PIL verify``) when there are at most 20000 files or a
    ``limit``, otherwise when first loaded. Raises :class:`DataError` for a missing or empty
    folder, no usable images, ``expected_classes`` != number of class folders, or folders named
    by ``expected_labels`` (the model's ``label_names``) in another order or with other names.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"Image folder {root} does not exist; expected the layout {_LAYOUT}.")
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a folder; expected the layout {_LAYOUT}.")
    classes, files = _scan(root)
    if not classes:
        raise DataError(
            f"{root} has no class subfolders; expected the layout {_LAYOUT}, one subfolder per "
            f"class (class index = sorted folder name order)."
        )
    if expected_classes is not None and len(classes) != expected_classes:
        raise DataError(
            f"{root} has {len(classes)} class folders but the model expects {expected_classes} "
            f"classes (found: {', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}). "
            f"Point at the dataset the model was trained for, with one folder per class."
        )
    if expected_labels is not None:
        _check_labels(root, classes, [str(x) for x in expected_labels])
    total = sum(len(f) for f in files)
    if total == 0:
        raise DataError(
            f"{root} has {len(classes)} class folders but no images ({', '.join(IMG_EXTENSIONS)}) "
            f"in them; expected the layout {_LAYOUT}."
        )
    if limit is not None:
        if limit <= 0:
            raise DataError(f"limit must be a positive number of images, got {limit}.")
        samples, bad = _balanced_pick(files, limit, seed, verify=True)
    else:
        verify = total <= VERIFY_MAX_FILES
        samples, bad = [], []
        for c, per_class in enumerate(files):
            for p in per_class:
                if not verify or _readable(p):
                    samples.append((p, c))
                else:
                    bad.append(p)
    if bad:
        warnings.warn(
            f"Skipped {len(bad)} unreadable image(s) in {root}: {_names(bad)}",
            DataWarning,
            stacklevel=2,
        )
    if not samples:
        raise DataError(
            f"None of the {total} image files in {root} could be read ({len(bad)} unreadable: "
            f"{_names(bad)}); replace them with valid image files, in the layout {_LAYOUT}."
        )
    return ImageFolderDataset(root, classes, samples, EvalTransform(model_info), bad)


def make_loader(
    dataset: Dataset, batch_size: int = 64, shuffle: bool = False, num_workers: int = 0
) -> DataLoader:
    """A plain ``DataLoader`` (deterministic order unless ``shuffle``)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        persistent_workers=False,
    )


def _model_device(model: Callable[..., Any]) -> torch.device | None:
    if isinstance(model, torch.nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return None


def evaluate_top1(
    model: Callable[[torch.Tensor], Any],
    loader: Iterable[Any],
    *,
    progress: bool = True,
    desc: str = "eval",
) -> dict[str, Any]:
    """Top-1 accuracy of ``model`` over ``loader`` (batches of ``(images, labels)``).

    Runs under ``torch.no_grad`` on the model's device, without changing its train/eval mode.
    Returns ``top1`` (fraction in [0, 1]), ``n`` and ``predictions`` (ints, loader order).
    """
    device = _model_device(model)
    predictions: list[int] = []
    correct = n = 0
    total = len(loader) if hasattr(loader, "__len__") else None
    with torch.no_grad():
        for images, labels in tqdm(loader, desc=desc, total=total, disable=not progress):
            if device is not None:
                images = images.to(device)
            out = model(images)
            if isinstance(out, (tuple, list)):
                out = out[0]
            pred = out.argmax(dim=-1).cpu()
            labels = torch.as_tensor(labels).cpu()
            correct += int((pred == labels).sum())
            n += int(labels.numel())
            predictions.extend(int(p) for p in pred.tolist())
    return {"top1": correct / n if n else 0.0, "n": n, "predictions": predictions}
