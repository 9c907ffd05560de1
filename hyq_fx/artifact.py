"""Save and load a quantized model as a directory: graph.json + model.safetensors (no pickle).

``save(gm, out_dir)`` writes the graph, every tensor (weights and quantizer scales) and the
quantization metadata of ``gm.meta["hyq"]`` (recipe, bits, the model's preprocessing);
``load(out_dir)`` restores a GraphModule whose outputs are identical to the saved one's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import fx

from .serialize import load_graph_module, save_graph_module
from .vocabulary import META_KEY

FIT_IMAGES_FILE = "fit_images.safetensors"


class OutputExistsError(FileExistsError):
    """The output directory already holds a result."""


def save(gm: fx.GraphModule, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    save_graph_module(gm, out, metadata=dict(gm.meta.get(META_KEY, {})))
    return out


def load(out_dir: str | Path) -> fx.GraphModule:
    """The quantized GraphModule saved in ``out_dir`` (by ``hyq-fx quantize --out`` or ``save``)."""
    gm, metadata = load_graph_module(out_dir)
    gm.meta[META_KEY] = metadata
    return gm.eval()


def save_fit_images(images: torch.Tensor, out_dir: str | Path) -> Path:
    """Keep a few preprocessed calibration images beside the model (``fit_images.safetensors``):
    exporters that fit requantization grids read them when no calibration folder is given."""
    path = Path(out_dir) / FIT_IMAGES_FILE
    save_file({"images": images.detach().float().contiguous()}, str(path))
    return path


def load_fit_images(out_dir: str | Path) -> torch.Tensor | None:
    """The images :func:`save_fit_images` kept in ``out_dir``, or None."""
    path = Path(out_dir) / FIT_IMAGES_FILE
    return load_file(str(path))["images"] if path.is_file() else None


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / "graph.json").is_file()


@contextlib.contextmanager
def atomic_output_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that is renamed to ``path`` if the block completes.

    The temporary file sits in the same directory (so the rename is atomic on POSIX) and keeps
    the suffix (TVM's ``export_library`` picks the linker from it). An interrupted write (an
    error, Ctrl-C) removes it and leaves ``path`` as it was: no partial file under the name.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.stem}.partial-", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp makes it private; an exported file is an ordinary one
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory that becomes ``out_dir`` only if the block completes.

    An interrupted run (an error, Ctrl-C) leaves no half-written ``out_dir``; an existing
    ``out_dir`` is replaced only with ``overwrite``, and only if it is empty or a previous
    result (it holds ``graph.json``): ``--overwrite`` never deletes an unrelated folder.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(
            f"output path {out} is a file, not a directory; choose another --out"
        )
    if out.exists() and not overwrite:
        raise OutputExistsError(
            f"output directory {out} already exists; choose another --out or pass --overwrite "
            "to replace it"
        )
    if out.exists() and not is_artifact(out) and any(out.iterdir()):
        raise OutputExistsError(
            f"output directory {out} is not a previous hyq-fx result (no graph.json) and is not "
            "empty; --overwrite only replaces a previous result, so it was left alone: choose "
            "another --out"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; a result dir is an ordinary one
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
