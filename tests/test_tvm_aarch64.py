"""aarch64 TVM libraries run, on this x86 host, and compute what the fake-quant model computes.

``backends/tvm_deploy.py`` builds the C++ runner (``backends/deploy/relax_vm_runner.cc``, TVM's C++
runtime) with ``aarch64-linux-gnu-g++`` against the aarch64 wheels' ``libtvm_runtime.so`` /
``libtvm_ffi.so`` and runs it under ``qemu-aarch64``. Checked here:

* an int8 library built with ``build_tvm(..., "aarch64", ...)`` returns, at batch 1 and 4, the
  fake-quant model's logits within 1e-4 and its top-1;
* the runner reports a wrong input shape (TVM's own check, from inside the emulated VM) as a
  ``TvmDeployError``, not a crash;
* the runner compiled natively (g++) against the installed TVM matches ``TvmRunner`` on an
  llvm library: the runner itself, without qemu;
* a bundle holds what a board needs, its prebuilt runner finds ``lib/`` by its rpath, and its
  Makefile builds a runner that gives the same logits;
* without the tools, or for a library it cannot run, the error says what to do.

The tests that run aarch64 code skip only when the cross compiler or qemu is missing
(``scripts/install_arm_tools.sh`` installs them); the first run downloads the aarch64 wheels
(~100 MB, ~6 MB kept in ``~/.cache/hyq-fx``).
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hyq_fx

tvm_relax = pytest.importorskip("hyq_fx.backends.tvm_relax")
tvm_deploy = pytest.importorskip("hyq_fx.backends.tvm_deploy")

MISSING_TOOLS = tvm_deploy.aarch64_tools_missing()
needs_arm_tools = pytest.mark.skipif(
    bool(MISSING_TOOLS),
    reason=f"missing {', '.join(MISSING_TOOLS)}: run scripts/install_arm_tools.sh",
)
INPUT_SHAPE = (3, 16, 16)
BUNDLE_FILES = (
    "model.aarch64.so", "model.aarch64.json", "relax_vm_runner.cc", "Makefile", "README.md",
    "relax_vm_runner", "lib/libtvm_runtime.so", "lib/libtvm_ffi.so", "lib/LICENSE.tvm",
    "include/tvm/ffi/function.h", "include/dlpack/dlpack.h",
)  # fmt: skip


class TinyHybrid(nn.Module):
    """conv(+BN, SiLU) → depthwise conv → a LayerNorm'd attention block → linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.norm = nn.LayerNorm(16)
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.bn(self.conv(x)))
        x = F.silu(self.dw(x)) + x
        t = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(self.norm(t)).chunk(3, dim=-1)
        attn = (q @ k.transpose(-2, -1) * 16**-0.5).softmax(-1)
        t = t + self.proj(attn @ v)
        return self.head(t.mean(1))


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *INPUT_SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def qgm() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return hyq_fx.quantize(TinyHybrid().eval(), _images(16, 0), "minmax", 8, 8, progress=False)


@pytest.fixture(scope="module")
def aarch64_library(qgm, tmp_path_factory):
    if MISSING_TOOLS:
        pytest.skip(f"missing {', '.join(MISSING_TOOLS)}: run scripts/install_arm_tools.sh")
    out = tmp_path_factory.mktemp("aarch64") / "model.aarch64.so"
    return tvm_relax.build_tvm(qgm, _images(1, 1), "aarch64", out)


def _assert_matches_fake_quant(logits: torch.Tensor, qgm, images: torch.Tensor) -> None:
    with torch.no_grad():
        expected = qgm(images)
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= 1e-4
    assert torch.equal(logits.argmax(1), expected.argmax(1))


@needs_arm_tools
@pytest.mark.parametrize("batch", [1, 4])
def test_aarch64_library_matches_fake_quant_under_qemu(qgm, aarch64_library, batch):
    images = _images(batch, 2)
    _assert_matches_fake_quant(tvm_deploy.run_aarch64(aarch64_library, images), qgm, images)


@needs_arm_tools
def test_runner_reports_what_tvm_rejects(aarch64_library):
    # past the Python checks: the library's own shape check fails inside the emulated VM
    runtime = tvm_deploy.aarch64_runtime()
    runner = tvm_deploy.build_runner(runtime)
    launcher = tvm_deploy.qemu_launcher(runtime)
    wrong = torch.zeros(1, 3, 16, 8)
    with pytest.raises(tvm_deploy.TvmDeployError, match=r"runner failed \(exit 3\).*shape"):
        tvm_deploy.run_runner(runner, aarch64_library, wrong, launcher=launcher)


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
def test_host_runner_matches_tvm_runner(qgm, tmp_path):
    # the runner itself, natively: the same program and API calls, no emulation
    library = tvm_relax.build_tvm(
        qgm, _images(1, 1), {"kind": "llvm", "opt-level": 0}, tmp_path / "model.llvm.so"
    )
    runtime = tvm_deploy.host_runtime()
    runner = tvm_deploy.build_runner(runtime)
    images = _images(3, 3)
    env = ["env", tvm_deploy.library_path_env(runtime)]
    result = tvm_deploy.run_runner(runner, library, images, launcher=env, repeat=2)
    assert result.first_ms > 0 and result.mean_ms > 0
    expected = tvm_relax.TvmRunner(library)(images)
    torch.testing.assert_close(result.logits, expected, atol=1e-6, rtol=0)


def _run_bundled(runner, library, images) -> torch.Tensor:
    # no LD_LIBRARY_PATH: the runner must find the bundle's lib/ by itself
    launcher = [tvm_deploy.QEMU, "-L", str(tvm_deploy.AARCH64_SYSROOT)]
    return tvm_deploy.run_runner(runner, library, images, launcher=launcher).logits


@needs_arm_tools
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_bundle_runs_and_its_makefile_builds_the_runner(qgm, aarch64_library, tmp_path):
    bundle = tvm_deploy.write_bundle(aarch64_library, tmp_path / "bundle")
    for name in BUNDLE_FILES:
        assert (bundle / name).is_file(), name
    assert "aarch64-linux-android" in (bundle / "README.md").read_text()
    images = _images(2, 4)
    library = bundle / "model.aarch64.so"
    prebuilt = _run_bundled(bundle / "relax_vm_runner", library, images)
    _assert_matches_fake_quant(prebuilt, qgm, images)

    make = ["make", "-C", str(bundle), f"CXX={tvm_deploy.CROSS_CXX}", "TVM_INCLUDE=include",
            "TVM_LIB=lib", "OUT=relax_vm_runner_make"]  # fmt: skip
    subprocess.run(make, check=True, capture_output=True)
    built = _run_bundled(bundle / "relax_vm_runner_make", library, images)
    _assert_matches_fake_quant(built, qgm, images)
    with pytest.raises(tvm_deploy.TvmDeployError, match="not an empty folder"):
        tvm_deploy.write_bundle(aarch64_library, bundle)


def _fake_library(tmp_path, **meta) -> object:
    library = tmp_path / "model.so"
    library.write_bytes(b"\x7fELF")
    meta = {"target": "aarch64", "batch": None, "input_shape": list(INPUT_SHAPE), **meta}
    library.with_suffix(".json").write_text(json.dumps(meta))
    return library


def test_missing_tools_say_how_to_install_them(tmp_path, monkeypatch):
    monkeypatch.setattr(tvm_deploy.shutil, "which", lambda name: None)
    with pytest.raises(tvm_deploy.TvmDeployError, match="qemu-aarch64.*apt-get install -y"):
        tvm_deploy.run_aarch64(_fake_library(tmp_path), _images(1, 0))
    with pytest.raises(tvm_deploy.TvmDeployError, match="aarch64-linux-gnu-g\\+\\+ is not on PATH"):
        tvm_deploy.build_runner(tvm_deploy.TvmRuntime("aarch64", "v", tmp_path, (tmp_path,)))


@pytest.mark.parametrize(
    ("meta", "images", "message"),
    [
        ({"target": "llvm"}, _images(1, 0), "built for 'llvm', not aarch64"),
        ({"batch": 4}, _images(1, 0), "batches of 4"),
        ({}, torch.zeros(1, 3, 8, 8), r"takes images \[3, 16, 16\], got \[3, 8, 8\]"),
        ({}, torch.zeros(3, 16, 16), r"must be \[N, C, H, W\]"),
    ],
)
def test_rejects_what_it_cannot_run(tmp_path, meta, images, message):
    with pytest.raises(tvm_deploy.TvmDeployError, match=message):
        tvm_deploy.run_aarch64(_fake_library(tmp_path, **meta), images)
    with pytest.raises(tvm_deploy.TvmDeployError, match="does not exist"):
        tvm_deploy.run_aarch64(tmp_path / "missing.so", images)


def test_cli_bundle_needs_the_aarch64_target(qgm, tmp_path, capsys):
    from hyq_fx.cli import main

    out = hyq_fx.save(qgm, tmp_path / "q")
    capsys.readouterr()
    argv = ["export", str(out), "--to", "tvm", "--bundle", str(tmp_path / "b")]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "--target aarch64" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()
