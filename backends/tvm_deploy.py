"""Run and ship aarch64 TVM libraries without an ARM machine: a C++ runner, qemu, a bundle.

``hyq-fx export OUT --to tvm --target aarch64`` writes ``model.aarch64.so``, a Relax VM library
for 64-bit ARM Linux. This module checks that such a library really runs and computes what the
fake-quant model computes, on an x86 Linux host:

1. :func:`aarch64_runtime` — TVM's runtime for aarch64 (``libtvm_runtime.so``, ``libtvm_ffi.so``
   and the tvm-ffi headers), taken from the aarch64 wheels of the *installed* apache-tvm and
   apache-tvm-ffi versions (downloaded once with pip, cached under :func:`cache_dir`).
2. :func:`build_runner` — ``backends/deploy/relax_vm_runner.cc``, a small C++ program on TVM's C++
   runtime API (load the library, ``vm_load_executable``, ``vm_initialization`` on the CPU,
   call ``main``), compiled with ``aarch64-linux-gnu-g++`` (or natively, :func:`host_runtime`).
3. :func:`run_aarch64` — the runner under ``qemu-aarch64 -L /usr/aarch64-linux-gnu`` on a batch
   of images (raw float32 files in and out): the logits as a torch tensor.
4. :func:`write_bundle` — a folder to copy to an ARM Linux board: the library, the runner's
   source, Makefile and (by default) prebuilt binary, TVM's aarch64 runtime and a README.

Invariant (``tests/test_tvm_aarch64.py``): the runner under qemu returns the logits of the
fake-quant model within 1e-4, with the same top-1. Every missing piece (cross compiler, qemu,
the aarch64 C library, the wheels) is a :class:`TvmDeployError` that says how to get it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hyq_fx.backends.tvm_relax import TvmBackendError

__all__ = [
    "APT_INSTALL",
    "RunnerResult",
    "TvmDeployError",
    "TvmRuntime",
    "aarch64_runtime",
    "aarch64_tools_missing",
    "build_runner",
    "cache_dir",
    "host_runtime",
    "library_path_env",
    "qemu_launcher",
    "run_aarch64",
    "run_aarch64_timed",
    "run_runner",
    "write_bundle",
]

DEPLOY_DIR = Path(__file__).resolve().parent / "deploy"
RUNNER_SOURCE = DEPLOY_DIR / "relax_vm_runner.cc"
RUNNER_MAKEFILE = DEPLOY_DIR / "Makefile"
CROSS_CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
AARCH64_SYSROOT = Path("/usr/aarch64-linux-gnu")
AARCH64_LOADER = AARCH64_SYSROOT / "lib" / "ld-linux-aarch64.so.1"
APT_INSTALL = "apt-get install -y gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user"
INSTALL_HINT = f"install the ARM tools: scripts/install_arm_tools.sh in hyq-fx, or {APT_INSTALL}"
# the runtime libraries the runner links and loads, and the wheel member each comes from
RUNTIME_LIBS = {
    "libtvm_runtime.so": ("apache-tvm", "tvm/lib/libtvm_runtime.so"),
    "libtvm_ffi.so": ("apache-tvm-ffi", "tvm_ffi/lib/libtvm_ffi.so"),
}
RUNTIME_LICENSES = {
    "LICENSE.tvm": ("apache-tvm", "tvm/LICENSE"),
    "NOTICE.tvm": ("apache-tvm", "tvm/NOTICE"),
    "LICENSE.tvm_ffi": ("apache-tvm-ffi", "licenses/LICENSE"),
    "NOTICE.tvm_ffi": ("apache-tvm-ffi", "licenses/NOTICE"),
}
WHEEL_PLATFORM = "manylinux_2_28_aarch64"
RUN_TIMEOUT_S = 900.0


class TvmDeployError(TvmBackendError):
    """An aarch64 library cannot be built into a runner or run; the message says what to do."""


@dataclass(frozen=True)
class TvmRuntime:
    """TVM's runtime for one CPU architecture: what the runner compiles against and loads.

    ``include_dir`` holds ``tvm/ffi/*.h`` and ``dlpack/dlpack.h``; ``lib_dirs`` hold
    ``libtvm_runtime.so`` and ``libtvm_ffi.so``, the same versions as the TVM that built the
    libraries to run (the Relax VM executable format is not stable across versions).
    """

    arch: str
    version: str
    include_dir: Path
    lib_dirs: tuple[Path, ...]


@dataclass(frozen=True)
class RunnerResult:
    """What one runner call returns: the logits of the last run and its timings (ms)."""

    logits: torch.Tensor
    first_ms: float
    mean_ms: float


# ---------------------------------------------------------------------------------------------
# the tools and TVM's runtime


def cache_dir() -> Path:
    """Where downloaded runtimes and built runners are kept: ``$HYQ_FX_CACHE``, else
    ``$XDG_CACHE_HOME/hyq-fx``, else ``~/.cache/hyq-fx``. Never inside the project."""
    if os.environ.get("HYQ_FX_CACHE"):
        return Path(os.environ["HYQ_FX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hyq-fx"


def aarch64_tools_missing() -> list[str]:
    """The host tools that building and running aarch64 runners needs and lacks (empty: none)."""
    missing = [tool for tool in (CROSS_CXX, QEMU) if shutil.which(tool) is None]
    if not AARCH64_LOADER.is_file():
        missing.append(f"the aarch64 C library ({AARCH64_SYSROOT})")
    return missing


def _require_tools() -> None:
    missing = aarch64_tools_missing()
    if missing:
        raise TvmDeployError(f"missing {', '.join(missing)}; {INSTALL_HINT}")


def _installed_versions() -> dict[str, str]:
    try:
        return {name: importlib.metadata.version(name) for name in ("apache-tvm", "apache-tvm-ffi")}
    except importlib.metadata.PackageNotFoundError as err:
        raise TvmDeployError(f"{err.name} is not installed: pip install hyq-fx") from err


def host_runtime() -> TvmRuntime:
    """The runtime of the installed (host) TVM, for building the runner natively."""
    import tvm.libinfo
    import tvm_ffi.libinfo

    versions = _installed_versions()
    tvm_lib = Path(tvm.libinfo.find_libtvm_runtime()).resolve().parent
    ffi_lib = Path(tvm_ffi.libinfo.find_libtvm_ffi()).resolve().parent
    include = Path(tvm_ffi.libinfo.find_include_path())
    version = f"tvm-{versions['apache-tvm']}-ffi-{versions['apache-tvm-ffi']}"
    return TvmRuntime("host", version, include, (tvm_lib, ffi_lib))


def _pip_download(versions: dict[str, str], dest: Path) -> None:
    """The aarch64 wheels of exactly ``versions`` into ``dest`` (pip, no dependencies)."""
    python = f"{sys.version_info.major}{sys.version_info.minor}"
    specs = [f"{name}=={version}" for name, version in versions.items()]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--platform", WHEEL_PLATFORM, "--python-version", python, "-d", str(dest), *specs]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise TvmDeployError(
            f"could not download the aarch64 wheels {' '.join(specs)} (offline?): "
            f"{proc.stderr.strip()[-800:]}\nOn a connected machine run `{' '.join(cmd[2:])}` and "
            "pass the folder as wheel_dir"
        )


def _find_wheels(folder: Path, versions: dict[str, str]) -> dict[str, Path] | None:
    """``{package: its aarch64 wheel in folder}``, or None if one is not there."""
    wheels = {}
    for name, version in versions.items():
        prefix = f"{name.replace('-', '_')}-{version}-"
        found = sorted(w for w in folder.glob(f"{prefix}*.whl") if "aarch64" in w.name)
        if not found:
            return None
        wheels[name] = found[0]
    return wheels


def _read_member(wheel: Path, member: str) -> bytes:
    """A file of a wheel; ``licenses/X`` is the one in its ``*.dist-info/licenses/``."""
    with zipfile.ZipFile(wheel) as whl:
        if member.startswith("licenses/"):
            member = "-".join(wheel.name.split("-")[:2]) + f".dist-info/{member}"
        return whl.read(member)


def _extract_runtime(wheels: dict[str, Path], dest: Path) -> None:
    """Write ``dest/lib`` (libraries and their licenses) and ``dest/include`` from the wheels."""
    (dest / "lib").mkdir(parents=True)
    for out_name, (package, member) in {**RUNTIME_LIBS, **RUNTIME_LICENSES}.items():
        (dest / "lib" / out_name).write_bytes(_read_member(wheels[package], member))
    (dest / "lib" / "libtvm_runtime.so").chmod(0o755)
    (dest / "lib" / "libtvm_ffi.so").chmod(0o755)
    prefix = "tvm_ffi/include/"
    with zipfile.ZipFile(wheels["apache-tvm-ffi"]) as whl:
        for info in whl.infolist():
            if info.filename.startswith(prefix) and not info.is_dir():
                out = dest / "include" / info.filename[len(prefix) :]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(whl.read(info))


def aarch64_runtime(wheel_dir: str | Path | None = None) -> TvmRuntime:
    """TVM's aarch64 runtime for the installed apache-tvm / apache-tvm-ffi versions.

    Cached in ``cache_dir()/aarch64-tvm-V-ffi-W/{lib,include}``; the first call takes the
    aarch64 wheels from ``wheel_dir`` (if given and they are there) or downloads them with pip
    (~100 MB, of which ~6 MB is kept). The cache folder appears complete or not at all.
    """
    versions = _installed_versions()
    version = f"tvm-{versions['apache-tvm']}-ffi-{versions['apache-tvm-ffi']}"
    root = cache_dir() / f"aarch64-{version}"
    runtime = TvmRuntime("aarch64", version, root / "include", (root / "lib",))
    if (root / "lib" / "libtvm_runtime.so").is_file():
        return runtime
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{root.name}.partial-") as tmp:
        wheels = _find_wheels(Path(wheel_dir), versions) if wheel_dir is not None else None
        if wheels is None:
            _pip_download(versions, Path(tmp) / "wheels")
            wheels = _find_wheels(Path(tmp) / "wheels", versions)
        if wheels is None:
            raise TvmDeployError(f"pip gave no aarch64 wheel for {versions}")
        _extract_runtime(wheels, Path(tmp) / "runtime")
        try:
            os.replace(Path(tmp) / "runtime", root)
        except OSError:  # another process finished first: keep its copy
            if not (root / "lib" / "libtvm_runtime.so").is_file():
                raise
    return runtime


# ---------------------------------------------------------------------------------------------
# the runner


def _compile_command(runtime: TvmRuntime, cxx: str, out: Path) -> list[str]:
    """The compiler call of ``deploy/Makefile``: the binary looks for TVM's runtime beside
    itself and in ``lib/`` beside itself (``$ORIGIN``), then on ``LD_LIBRARY_PATH``."""
    libs = [arg for d in runtime.lib_dirs for arg in (f"-L{d}", f"-Wl,-rpath-link,{d}")]
    return [cxx, "-std=c++17", "-Wall", f"-I{runtime.include_dir}", "-O2", "-o", str(out),
            str(RUNNER_SOURCE), *libs, "-Wl,-rpath,$ORIGIN:$ORIGIN/lib", "-Wl,--no-as-needed",
            "-ltvm_runtime", "-ltvm_ffi", "-Wl,--as-needed"]  # fmt: skip


def library_path_env(runtime: TvmRuntime) -> str:
    """``LD_LIBRARY_PATH=...`` that lets a runner built by :func:`build_runner` find ``runtime``."""
    return "LD_LIBRARY_PATH=" + ":".join(map(str, runtime.lib_dirs))


def build_runner(runtime: TvmRuntime | None = None, cxx: str | None = None) -> Path:
    """The runner binary for ``runtime`` (default :func:`aarch64_runtime`), built if needed.

    ``cxx`` defaults to ``aarch64-linux-gnu-g++`` for aarch64 and ``$CXX`` or ``g++`` for the
    host. The binary is cached beside the runtime, keyed by a hash of the compile command and
    the source, so an edited ``relax_vm_runner.cc`` is rebuilt.
    """
    runtime = runtime or aarch64_runtime()
    if cxx is None:
        cxx = CROSS_CXX if runtime.arch == "aarch64" else os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        hint = INSTALL_HINT if runtime.arch == "aarch64" else "apt-get install -y g++"
        raise TvmDeployError(f"the C++ compiler {cxx} is not on PATH; {hint}")
    folder = cache_dir() / f"{runtime.arch}-{runtime.version}" / "bin"
    key = hashlib.sha256(RUNNER_SOURCE.read_bytes())
    key.update(" ".join(_compile_command(runtime, cxx, Path("out"))).encode())
    out = folder / f"relax_vm_runner-{key.hexdigest()[:12]}"
    if out.is_file():
        return out
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{out.name}.partial-{os.getpid()}"
    proc = subprocess.run(_compile_command(runtime, cxx, tmp), capture_output=True, text=True)
    if proc.returncode:
        tmp.unlink(missing_ok=True)
        raise TvmDeployError(f"compiling {RUNNER_SOURCE.name} failed:\n{proc.stderr[-3000:]}")
    os.replace(tmp, out)
    return out


def _parse_runner_stdout(stdout: str) -> tuple[list[int], float, float]:
    fields = dict(line.split(" ", 1) for line in stdout.splitlines() if " " in line)
    try:
        shape = [int(d) for d in fields["output_shape"].split(",")]
        first_ms, mean_ms = (float(t) for t in fields["run_ms"].split())
    except (KeyError, ValueError) as err:
        raise TvmDeployError(f"unexpected runner output: {stdout[-500:]!r}") from err
    return shape, first_ms, mean_ms


def run_runner(
    runner: str | Path,
    library: str | Path,
    images: torch.Tensor,
    *,
    launcher: Sequence[str] = (),
    repeat: int = 1,
    timeout_s: float = RUN_TIMEOUT_S,
) -> RunnerResult:
    """Run ``launcher + [runner, library, ...]`` on ``images`` (float32 NCHW, any batch the
    library accepts) and return its logits (float32, on the CPU) and timings."""
    x = np.ascontiguousarray(images.detach().cpu().float().numpy())
    with tempfile.TemporaryDirectory(prefix="hyq-fx-runner-") as tmp:
        in_file, out_file = Path(tmp) / "images.f32", Path(tmp) / "logits.f32"
        x.tofile(in_file)
        shape = ",".join(str(d) for d in x.shape)
        cmd = [*launcher, str(runner), str(Path(library).resolve()), str(in_file), shape,
               str(out_file), "--repeat", str(repeat)]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            raise TvmDeployError(f"the runner took over {timeout_s:.0f} s: {cmd}") from err
        if proc.returncode:
            raise TvmDeployError(
                f"the runner failed (exit {proc.returncode}) on {library}: "
                f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
            )
        out_shape, first_ms, mean_ms = _parse_runner_stdout(proc.stdout)
        logits = np.fromfile(out_file, dtype=np.float32).reshape(out_shape)
    return RunnerResult(torch.from_numpy(logits), first_ms, mean_ms)


# ---------------------------------------------------------------------------------------------
# aarch64 libraries under qemu


def _library_meta(library: Path) -> dict:
    meta = library.with_suffix(".json")
    return json.loads(meta.read_text()) if meta.is_file() else {}


def _check_aarch64_library(library: Path) -> dict:
    """The library's ``.json`` (``{}`` without one), after checking it is an aarch64 library."""
    if not library.is_file():
        raise TvmDeployError(
            f"{library} does not exist; build it with `hyq-fx export OUT --to tvm --target aarch64`"
        )
    meta = _library_meta(library)
    target = meta.get("target", "aarch64")
    if target != "aarch64":
        raise TvmDeployError(f"{library} was built for {target!r}, not aarch64")
    return meta


def _check_images(library: Path, meta: dict, images: torch.Tensor) -> None:
    if images.dim() != 4:
        raise TvmDeployError(f"images must be [N, C, H, W], got shape {list(images.shape)}")
    batch, shape = meta.get("batch"), meta.get("input_shape")
    if batch is not None and images.shape[0] != batch:
        raise TvmDeployError(
            f"{library} takes batches of {batch} (a static-batch build), got {images.shape[0]}"
        )
    if shape is not None and list(images.shape[1:]) != list(shape):
        raise TvmDeployError(f"{library} takes images {shape}, got {list(images.shape[1:])}")


def qemu_launcher(runtime: TvmRuntime, threads: int | None = None) -> list[str]:
    """``qemu-aarch64 -L /usr/aarch64-linux-gnu`` with the runtime on the guest's library path
    (and ``TVM_NUM_THREADS`` when ``threads`` is given)."""
    env = [library_path_env(runtime)] + ([f"TVM_NUM_THREADS={threads}"] if threads else [])
    return [QEMU, "-L", str(AARCH64_SYSROOT), *(arg for e in env for arg in ("-E", e))]


def run_aarch64_timed(
    library: str | Path,
    images: torch.Tensor,
    *,
    repeat: int = 1,
    threads: int | None = None,
    wheel_dir: str | Path | None = None,
) -> RunnerResult:
    """:func:`run_aarch64` with the runner's timings (milliseconds of emulated time: they
    measure qemu on this host, not an ARM CPU)."""
    library = Path(library)
    _check_images(library, _check_aarch64_library(library), images)
    _require_tools()
    runtime = aarch64_runtime(wheel_dir)
    runner = build_runner(runtime)
    launcher = qemu_launcher(runtime, threads)
    return run_runner(runner, library, images, launcher=launcher, repeat=repeat)


def run_aarch64(
    library: str | Path,
    images: torch.Tensor,
    *,
    threads: int | None = None,
    wheel_dir: str | Path | None = None,
) -> torch.Tensor:
    """The logits of an aarch64 library (``build_tvm(..., "aarch64", ...)``) on ``images``.

    Runs the C++ runner (TVM's C++ runtime, as on a board) under qemu user-mode emulation on
    this x86 host. ``images``: float32 ``[N, C, H, W]``; a static-batch library needs N equal
    to its batch. Raises :class:`TvmDeployError` naming what is missing and how to install it.
    """
    return run_aarch64_timed(library, images, threads=threads, wheel_dir=wheel_dir).logits


# ---------------------------------------------------------------------------------------------
# a folder for the board

_BUNDLE_README = """\
# {name}: an int8 model for 64-bit ARM Linux (TVM Relax VM)

Written by hyq-fx from `{library}` ({versions}).

| file | what |
|---|---|
| `{library}` | the model: a TVM Relax VM library for aarch64 (NEON + dot-product instructions) |
| `{library_json}` | how it was built: input shape `{input_shape}`, batch {batch} |
| `relax_vm_runner.cc`, `Makefile` | a small C++ program that runs the model on one batch |
| `lib/` | TVM's aarch64 runtime `libtvm_runtime.so`, `libtvm_ffi.so` (Apache-2.0, see `lib/`) |
| `include/` | the tvm-ffi and DLPack headers the runner compiles against |
{runner_row}
The CPU must have the dot-product extension (ARMv8.2-A, `asimddp` in `/proc/cpuinfo`: Cortex-A55,
A76 and later, Graviton 2 and later). TVM's runtime in `lib/` needs glibc 2.28 or later (the
manylinux_2_28 wheels). The prebuilt `relax_vm_runner` needs the glibc and libstdc++ of the machine
that built it or later: if it stops with "version `GLIBC_2.xx' not found", rebuild it on the board.

## Build the runner

On the board (Debian/Ubuntu: `apt-get install -y g++ make`):

    make TVM_INCLUDE=include TVM_LIB=lib

or on an x86 Linux machine (`apt-get install -y g++-aarch64-linux-gnu make`), then copy the folder:

    make CXX=aarch64-linux-gnu-g++ TVM_INCLUDE=include TVM_LIB=lib

## Run

The input is raw little-endian float32 in NCHW order, preprocessed as for the float model
(e.g. `numpy.asarray(x, numpy.float32).tofile("images.f32")`):

    ./relax_vm_runner {library} images.f32 {example_shape} logits.f32 --repeat 20

It writes the logits as raw float32 and prints `output_shape N,K` and `run_ms FIRST MEAN`.
The runner finds `lib/` beside itself (rpath `$ORIGIN/lib`); `TVM_NUM_THREADS=N` sets the number
of threads. Without an ARM board, on x86 Linux with `qemu-user` installed:

    qemu-aarch64 -L /usr/aarch64-linux-gnu \\
        ./relax_vm_runner {library} images.f32 {example_shape} logits.f32

## Android (not built by hyq-fx; what changes)

Android's C library is bionic, not glibc, so none of the three binaries here runs there as is:

* the runtime: build TVM's `tvm_runtime` target from the TVM source of the same version
  ({tvm_version}) with the NDK's CMake toolchain
  (`-DCMAKE_TOOLCHAIN_FILE=$NDK/build/cmake/android.toolchain.cmake -DANDROID_ABI=arm64-v8a
  -DANDROID_PLATFORM=android-24`); it gives `libtvm_runtime.so` and `libtvm_ffi.so` for `lib/`;
* the model: target `llvm -mtriple=aarch64-linux-android -mattr=+neon,+dotprod`, linked with the
  NDK's clang (`clang --target=aarch64-linux-android24 -shared`) instead of `aarch64-linux-gnu-gcc`;
* the runner: `make CXX="$NDK/toolchains/llvm/prebuilt/linux-x86_64/bin/clang++
  --target=aarch64-linux-android24" TVM_INCLUDE=include TVM_LIB=lib`, then
  `adb push` the folder to `/data/local/tmp/` and run it there with `adb shell`
  (`LD_LIBRARY_PATH=lib` if the loader ignores the rpath; ship `libc++_shared.so` if the NDK's
  clang links it dynamically).
"""


def _check_bundle_dir(bundle_dir: Path) -> None:
    if bundle_dir.exists() and (not bundle_dir.is_dir() or any(bundle_dir.iterdir())):
        raise TvmDeployError(f"{bundle_dir} exists and is not an empty folder; choose another")


def _bundle_readme(library: Path, runtime: TvmRuntime, prebuilt: bool) -> str:
    meta = _library_meta(library)
    shape = meta.get("input_shape") or ["C", "H", "W"]
    batch = meta.get("batch")
    runner_row = "| `relax_vm_runner` | the runner, prebuilt for aarch64 (or build it as below) |\n"
    return _BUNDLE_README.format(
        name=library.stem,
        library=library.name,
        library_json=library.with_suffix(".json").name,
        versions=runtime.version,
        tvm_version=runtime.version.split("-")[1],
        input_shape=shape,
        batch=batch if batch is not None else "any",
        example_shape=",".join(str(d) for d in [batch or 1, *shape]),
        runner_row=runner_row if prebuilt else "",
    )


def write_bundle(
    library: str | Path,
    bundle_dir: str | Path,
    *,
    prebuilt_runner: bool = True,
    wheel_dir: str | Path | None = None,
) -> Path:
    """Write a folder to copy to an ARM Linux board and run ``library`` there; returns it.

    ``bundle_dir`` (new or empty) gets the library and its ``.json``, ``relax_vm_runner.cc``,
    ``Makefile``, ``README.md``, TVM's aarch64 runtime in ``lib/`` and its headers in
    ``include/``, and with ``prebuilt_runner`` (needs ``aarch64-linux-gnu-g++``) the runner
    binary. The folder appears complete or not at all.
    """
    library, bundle_dir = Path(library), Path(bundle_dir)
    _check_aarch64_library(library)
    _check_bundle_dir(bundle_dir)
    runtime = aarch64_runtime(wheel_dir)
    runner = build_runner(runtime) if prebuilt_runner else None
    bundle_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{bundle_dir.name}.partial-", dir=bundle_dir.parent))
    try:
        for path in (library, library.with_suffix(".json"), RUNNER_SOURCE, RUNNER_MAKEFILE):
            if path.is_file():
                shutil.copy2(path, staging / path.name)
        shutil.copytree(runtime.lib_dirs[0], staging / "lib")
        shutil.copytree(runtime.include_dir, staging / "include")
        if runner is not None:
            shutil.copy2(runner, staging / "relax_vm_runner")
        (staging / "README.md").write_text(_bundle_readme(library, runtime, runner is not None))
        staging.chmod(0o755)
        if bundle_dir.exists():
            bundle_dir.rmdir()
        os.replace(staging, bundle_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return bundle_dir
