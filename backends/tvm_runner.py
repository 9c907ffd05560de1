"""TVM backend, runtime side: run a library built by ``build_tvm`` in the Relax VM.

``TvmRunner(path)`` loads the library and the ``.json`` written beside it (``_metadata_path``:
target, batch, input shape, the model's preprocessing) and is a callable, torch images
``[N, C, H, W]`` → torch logits, on ``"cpu"`` or ``"cuda"`` (default: the library's target); a
static-batch library runs larger batches in chunks and pads a short last chunk. ``load_tvm``
gives ``(runner, model_info)`` (``hyq-fx eval LIB.so``), ``is_tvm_library`` tells such a
library. An aarch64 library is refused on this host (run it on an aarch64 machine or over
``tvm.rpc``).

A deployment machine needs only TVM's runtime (``TVM_USE_RUNTIME_LIB=1``, or a TVM without
``libtvm_compiler.so``): for a CUDA library ``_load_cuda_runtime`` then loads TVM's CUDA runtime
and ``_register_cuda_compiler`` compiles the library's CUDA C++ with ``nvcc`` for the device at
hand. This module imports TVM only inside those calls and nothing of the build side (lowering,
Relax passes, tuning). ``TvmBackendError``, the error of every step of the TVM backend, is
defined here, the module every other TVM module may import.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


class TvmBackendError(RuntimeError):
    """The model cannot be built or run with TVM; the message says where and how to fix it."""


def _metadata_path(lib_path: Path) -> Path:
    return lib_path.with_suffix(".json")


def _load_cuda_runtime() -> None:
    """Register TVM's CUDA device API when TVM runs without its compiler.

    A deployment machine needs only TVM's runtime (``TVM_USE_RUNTIME_LIB=1``, or a TVM without
    ``libtvm_compiler.so``: 3 MB instead of 260 MB). In that mode ``import tvm`` skips the
    backend autoload that loads ``libtvm_runtime_cuda.so``, so CUDA libraries would not load.
    """
    import tvm.base
    from tvm_ffi.libinfo import load_lib_ctypes

    libs = tvm.base._LOADED_LIBS
    if not tvm.base._RUNTIME_ONLY or "tvm_runtime_cuda" in libs:
        return
    runtime_dir = Path(libs["tvm_runtime"]._name).resolve().parent
    try:
        libs["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm",
            target_name="tvm_runtime_cuda",
            extra_lib_paths=[runtime_dir],
            mode="RTLD_LOCAL",
        )
    except (OSError, RuntimeError) as err:
        raise TvmBackendError(
            f"TVM's CUDA runtime (libtvm_runtime_cuda.so beside {runtime_dir}) could not be "
            f"loaded: {err}. Run on a machine with the NVIDIA driver and the CUDA runtime."
        ) from err


def _register_cuda_compiler() -> None:
    """Compile a library's CUDA kernels with ``nvcc`` when it is loaded by a runtime-only TVM.

    TVM 0.27 CUDA libraries carry CUDA C++ that the loader compiles for the GPU at hand
    (``tvm_callback_cuda_compile``); TVM's own callback needs the compiler library (its target
    API), absent in a runtime-only install, so this one calls ``nvcc`` for the device's arch.
    """
    import subprocess
    import tempfile

    import tvm
    import tvm.base
    import tvm_ffi

    if not tvm.base._RUNTIME_ONLY:
        return
    arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")

    def compile_cuda(code: str, *_: Any) -> bytearray:
        with tempfile.TemporaryDirectory() as tmp:
            src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
            src.write_text(code)
            cmd = ["nvcc", "--fatbin", "-O3", f"-arch={arch}", "-o", str(out), str(src)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True)
            except OSError as err:
                raise TvmBackendError(f"loading a CUDA library needs nvcc on PATH: {err}") from err
            if proc.returncode:
                raise TvmBackendError(f"nvcc failed on the kernels: {proc.stderr[-2000:]}")
            return bytearray(out.read_bytes())

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)


class TvmRunner:
    """A built library as a callable: torch images ``[N, C, H, W]`` → torch logits (Relax VM).

    ``device`` is ``"cpu"`` or ``"cuda"`` (default: the one the library was built for).
    Works with ``hyq_fx.data.evaluate_top1(runner, loader)``. A static-batch library runs
    larger batches in chunks and pads a short last chunk.
    """

    def __init__(self, path: str | Path, device: str | None = None) -> None:
        import tvm
        from tvm.runtime.vm import VirtualMachine  # in runtime-only TVM too (no tvm.relax)

        self.path = Path(path)
        if not self.path.is_file():
            raise TvmBackendError(
                f"{self.path} does not exist; build it with build_tvm() or "
                "`hyq-fx export OUT --to tvm`"
            )
        meta_file = _metadata_path(self.path)
        self.meta: dict[str, Any] = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        if self.meta.get("target") == "aarch64":
            raise TvmBackendError(
                f"{self.path} is an aarch64 library; run it on an aarch64 machine (with tvm "
                "installed) or over tvm.rpc, not on this host"
            )
        device = device or ("cuda" if self.meta.get("target") == "cuda" else "cpu")
        if device == "cuda":
            _load_cuda_runtime()
            _register_cuda_compiler()
        self.device = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
        self._tensor = tvm.runtime.tensor
        self.vm = VirtualMachine(tvm.runtime.load_module(str(self.path)), self.device)
        self.batch: int | None = self.meta.get("batch")

    @property
    def model_info(self) -> dict[str, Any]:
        return dict(self.meta.get("model_info") or {})

    def _run(self, x: np.ndarray) -> np.ndarray:
        out = self.vm["main"](self._tensor(x, self.device))
        while not hasattr(out, "numpy"):  # a tuple of outputs: the logits are the first
            out = out[0]
        return out.numpy()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(images.detach().cpu().float().numpy())
        if self.batch is None or x.shape[0] == self.batch:
            return torch.from_numpy(self._run(x))
        outs = []
        for start in range(0, x.shape[0], self.batch):
            chunk = x[start : start + self.batch]
            n = chunk.shape[0]
            if n < self.batch:
                pad = np.zeros((self.batch - n, *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            outs.append(self._run(chunk)[:n])
        return torch.from_numpy(np.concatenate(outs))


def load_tvm(path: str | Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any]]:
    """``(runner, model_info)`` for a built library: what ``hyq-fx eval LIB.so`` needs."""
    runner = TvmRunner(path)
    return runner, runner.model_info


def is_tvm_library(path: str | Path) -> bool:
    """Whether ``path`` is a library written by :func:`build_tvm` (a ``.so`` with its ``.json``)."""
    path = Path(path)
    meta = _metadata_path(path)
    if path.suffix != ".so" or not path.is_file() or not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("format", "").startswith("hyq-fx tvm-relax")
    except (OSError, json.JSONDecodeError):
        return False
