# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 05 · Deploy: ONNX QDQ in onnxruntime, and TVM libraries for llvm, aarch64 and CUDA
#
# The fake-quant GraphModule says *what* to compute; deployment needs real int8. We quantize
# the bundled CIFAR-10 MobileViT-XXS (W8A8, `minmax`), export a QDQ ONNX file (int8 weights
# stored once, per-channel scales) and run it in onnxruntime, then lower it to TVM Relax, where
# conv2d / matmul become int8 × int8 → int32 with a float requantization, and build a library
# per target: the host CPU (built and run), a 64-bit ARM phone (cross-compiled) and CUDA (built
# only when asked, see below; running it needs a GPU). Each deployed model is compared with the
# fake-quant graph on the same images: the logits differ by rounding only, and the predicted
# classes should agree.
#
# To stay within a few minutes on a 2-core CPU: 32 calibration and 64 evaluation images, the
# CPU libraries are built at LLVM -O0 (the default -O3 builds faster code, more slowly) and the
# -O0 TVM library runs on 16 of the images.

# %%
import os
import shutil
import time
from pathlib import Path

import torch

import hyq_fx
from hyq_fx.backends import tvm_relax
from hyq_fx.backends.onnx_qdq import OnnxRunner, export_onnx_qdq, onnx_node_counts

OUT = Path(os.environ.get("HYQ_TUTORIAL_OUT", "tutorials/_out"))
OUT.mkdir(parents=True, exist_ok=True)
model, info = hyq_fx.models.load_model("embedded:mobilevit_xxs.cifar10")
cifar = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
if cifar.is_dir():
    from hyq_fx.data import image_folder

    def batch(split, n):
        ds = image_folder(cifar / split, info, limit=n)
        images, labels = zip(*(ds[i] for i in range(len(ds))), strict=True)
        return torch.stack(images), torch.tensor(labels)

    calib, _ = batch("calib", 32)
    x, labels = batch("dev", 64)
else:  # no shared data: images synthesised from the checkpoint's BatchNorm statistics
    from hyq_fx.synth import synthesize_from_batchnorm

    calib = synthesize_from_batchnorm(model, 16, steps=10, progress=False)
    x = synthesize_from_batchnorm(model, 32, steps=10, seed=1, progress=False)
    labels = None
qgm = hyq_fx.quantize(model, calib, "minmax", 8, 8, progress=False)
with torch.no_grad():
    fp32, reference = model(x), qgm(x)


def compare(name: str, logits: torch.Tensor, seconds: float) -> None:
    """How far a deployed model's logits are from the fake-quant graph's (on the first
    ``len(logits)`` images)."""
    n = len(logits)
    agree = (logits.argmax(1) == reference[:n].argmax(1)).float().mean().item()
    line = (
        f"{name} on {n} images: max |Δ| vs fake-quant = {(logits - reference[:n]).abs().max():.4f}"
    )
    line += f", top-1 agreement = {agree:.3f}"
    if labels is not None:
        line += f", top-1 = {(logits.argmax(1) == labels[:n]).float().mean().item():.3f}"
    print(f"{line}  ({seconds:.0f} s)")


if labels is not None:
    for name, logits in (("FP32", fp32), ("fake-quant W8A8", reference)):
        top1 = (logits.argmax(1) == labels).float().mean().item()
        print(f"{name}: top-1 = {top1:.3f} on {len(labels)} CIFAR-10 dev images")

# %% [markdown]
# ## ONNX QDQ
# Each FakeQuantizer becomes a `QuantizeLinear → DequantizeLinear` pair (weights are stored as
# int8 initializers with only the `DequantizeLinear`); onnxruntime fuses `DQ → Conv/MatMul → Q`
# into integer kernels.

# %%
start = time.perf_counter()
onnx_path = export_onnx_qdq(qgm, OUT / "model.qdq.onnx", calib[:1], calib=calib)
counts = onnx_node_counts(onnx_path)
print(
    {
        k: v
        for k, v in counts.items()
        if k in ("QuantizeLinear", "DequantizeLinear", "Conv", "MatMul")
    }
)
print(f"file: {onnx_path.stat().st_size / 1e6:.2f} MB")
runner = OnnxRunner(onnx_path)
compare("onnxruntime", runner(x), time.perf_counter() - start)

# %% [markdown]
# ## TVM Relax on this CPU
# `lower_quantizers` turns each FakeQuantizer into explicit int8 quantize/dequantize ops; the
# Relax pass `IntegerizeQDQ` rewrites `dequantize → conv2d/matmul` into integer kernels.

# %%
start = time.perf_counter()
lib = tvm_relax.build_tvm(qgm, x[:1], {"kind": "llvm", "opt-level": 0}, OUT / "model.llvm.so")
tvm_runner = tvm_relax.TvmRunner(lib)
compare("TVM llvm", tvm_runner(x[:16]), time.perf_counter() - start)
print("int8 ops in the built module:", tvm_runner.meta.get("ops", tvm_runner.meta))

# %% [markdown]
# ## Cross-compiling for a phone (aarch64) and building for CUDA
# The aarch64 library needs a cross linker (Debian: `apt-get install gcc-aarch64-linux-gnu`);
# we check that what was written is an ARM64 ELF file. The CUDA build needs no GPU, only TVM
# and `nvcc`, but takes about 2.5 minutes on 2 CPU cores (most of it TVM parsing its tensor-core
# intrinsics on first use), so it runs only with `HYQ_TUTORIAL_CUDA=1`; the command line does
# the same with `hyq-fx export OUT --to tvm --target cuda`. To keep CI short the aarch64 build
# (35 s) runs only with `HYQ_TUTORIAL_AARCH64=1` too. `benchmarks/results/cuda.md` shows such
# CUDA libraries run on an H100 (loaded by a TVM runtime without the compiler).

# %%
if os.environ.get("HYQ_TUTORIAL_AARCH64") != "1":
    print("aarch64: not built (35 s on 2 CPU cores; tests/test_tvm_backend.py cross-compiles a "
          "small model in CI); set HYQ_TUTORIAL_AARCH64=1 to build it")  # fmt: skip
elif shutil.which(tvm_relax.CROSS_CC["aarch64"]):
    start = time.perf_counter()
    arm_target = {**tvm_relax.TARGETS["aarch64"], "opt-level": 0}
    arm = tvm_relax.build_tvm(qgm, x[:1], arm_target, OUT / "model.aarch64.so")
    machine = int.from_bytes(arm.read_bytes()[18:20], "little")
    print(f"aarch64 library: {arm.stat().st_size / 1e6:.1f} MB, ELF machine {machine} "
          f"({'AArch64' if machine == 183 else 'not AArch64!'})  "
          f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
else:
    print(f"aarch64: skipped, the cross compiler {tvm_relax.CROSS_CC['aarch64']} is not "
          "installed (apt-get install gcc-aarch64-linux-gnu)")  # fmt: skip
if os.environ.get("HYQ_TUTORIAL_CUDA") != "1":
    print("cuda: not built (about 2.5 min on 2 CPU cores); set HYQ_TUTORIAL_CUDA=1 to build it")
elif shutil.which("nvcc"):
    start = time.perf_counter()
    try:
        cuda = tvm_relax.build_tvm(qgm, x[:1], "cuda", OUT / "model.cuda.so")
        print(f"cuda library: {cuda.stat().st_size / 1e6:.1f} MB "
              f"({time.perf_counter() - start:.0f} s); run it on a GPU machine "
              "with hyq-fx eval model.cuda.so --data DIR")  # fmt: skip
    except tvm_relax.TvmBackendError as exc:
        print("cuda: the build failed:", str(exc)[:300])
else:
    print("cuda: skipped, nvcc (the CUDA compiler) is not on PATH")
