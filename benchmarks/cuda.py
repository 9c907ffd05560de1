"""GPU benchmark: TVM CUDA builds (FP32 and int8) against torch eager and torch.compile.

Three stages, because the CUDA libraries are built on this CPU machine (``hyq-fx export --to
tvm --target cuda`` needs no GPU) and run on a lent GPU machine, which gets only a copy of the
working tree (64 MiB):

1. ``prepare`` (here, CPU): per model, quantize with ``--recipe`` at W8A8 (cached in
   ``--work``), build ``tvm_fp32`` and ``tvm_int8`` CUDA libraries (batch dimension symbolic),
   and write them to a *bundle* with the reference logits of the FP32 model and of the
   fake-quant model on ``--limit`` dev images (computed here, on CPU).
2. ``measure`` (on the GPU machine, with a runtime-only TVM: ``TVM_USE_RUNTIME_LIB=1``; the
   checkpoints and dev images are read from ``$HYQ_SHARED``, a copy of ``../shared``): top-1 of
   each TVM library on those images, agreement with its reference and the largest logit
   difference, then latency (median of ``--runs`` synchronised runs after ``--warmup``) at each
   batch for torch FP32 eager, ``torch.compile`` (default and ``reduce-overhead``), TVM FP32
   and TVM int8. Writes ``OUT/cuda.json``.
3. ``report`` (here): merges that JSON into ``benchmarks/results/cuda.{json,md}``.

    python benchmarks/cuda.py prepare --bundle .gpu-bundle
    # on the GPU machine (see the device command in benchmarks/results/cuda.md):
    python benchmarks/cuda.py measure --bundle .gpu-bundle --out $OUT
    python benchmarks/cuda.py report --measured /path/to/cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODELS = ("mobilevit_xxs.cifar10", "mobilevitv2_050.cifar10")
TIMED = (
    "torch_eager", "torch_compile", "torch_compile_ro", "tvm_fp32", "tvm_int8", "tvm_int8_tc"
)  # fmt: skip
VARIANTS = (("tvm_fp32", False, False), ("tvm_int8", True, False), ("tvm_int8_tc", True, True))
REFERENCE = {"tvm_fp32": "fp32", "tvm_int8": "fake_quant", "tvm_int8_tc": "fake_quant"}
LABELS = {
    "torch_eager": "torch FP32 eager",
    "torch_compile": "torch.compile FP32 (default mode)",
    "torch_compile_ro": "torch.compile FP32 (mode=reduce-overhead, CUDA graphs)",
    "tvm_fp32": "TVM Relax FP32, cuda (dlight default schedules, untuned)",
    "tvm_int8": "TVM Relax int8 conv/matmul (IntegerizeQDQ), cuda (dlight, untuned)",
    "tvm_int8_tc": "TVM Relax int8, cuda, int8 tensor-core tensorization (dlight, untuned)",
}


# --------------------------------------------------------------------------- prepare (CPU)
def prepare(args: argparse.Namespace) -> None:
    from common import SHARED, load_quantized

    from hyq_fx.backends.tvm_relax import build_tvm
    from hyq_fx.data import image_folder

    bundle, work = Path(args.bundle), Path(args.work)
    bundle.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    old = bundle / "manifest.json"  # prepare may run per model, in parallel: merge
    manifest = json.loads(old.read_text()) if old.exists() else {"models": {}}
    manifest["recipe"], manifest["arch"] = args.recipe, args.arch
    target = {"kind": "cuda", "arch": args.arch}  # kernels compiled to cubin now, not at load
    for name in args.models:
        model, info, calib, qgm = load_quantized(name, args.recipe, args.calib_size, work)
        mdir = bundle / name
        mdir.mkdir(exist_ok=True)
        example = torch.stack([calib[i][0] for i in range(2)])
        for key, integer, tensor_cores in VARIANTS:
            lib = mdir / f"{key}.cuda.so"
            if key == "tvm_int8_tc" and not args.tensor_cores:
                continue
            if not lib.exists():
                start = time.perf_counter()
                build_tvm(
                    qgm, example, target, lib, integer=integer, int8_tensor_cores=tensor_cores
                )
                print(f"{name} {key}: built in {time.perf_counter() - start:.0f} s", flush=True)
        dev = image_folder(SHARED / "data/cifar10/dev", info, limit=args.limit)
        manifest["models"][name] = {"n_images": len(dev), "limit": args.limit}
        if not (mdir / "reference.npz").exists():  # else an earlier run got this far
            _write_reference(mdir, name, dev, model, qgm)
        if old.exists():
            manifest["models"] = {**json.loads(old.read_text())["models"], **manifest["models"]}
        old.write_text(json.dumps(manifest, indent=2, default=str))


def _write_reference(mdir: Path, name: str, dev, model, qgm) -> None:
    """Logits of the FP32 and the fake-quant model on ``dev`` (CPU) → ``reference.npz``."""
    from hyq_fx.data import evaluate_top1, make_loader

    refs = {}
    loader = make_loader(dev, batch_size=100)
    for key, fn in (("fp32", model), ("fake_quant", qgm)):
        logits = []

        def keep(x, fn=fn, logits=logits):
            out = fn(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            logits.append(out.detach().float().numpy())
            return out

        result = evaluate_top1(keep, loader, desc=f"{name} {key}")
        refs[key] = np.concatenate(logits)
        print(f"{name} {key}: top-1 {100 * result['top1']:.2f} on {result['n']}", flush=True)
    np.savez_compressed(
        mdir / "reference.npz",
        labels=np.asarray(dev.targets, dtype=np.int64),
        fp32=refs["fp32"],
        fake_quant=refs["fake_quant"],
    )


# --------------------------------------------------------------------------- measure (GPU)
def _time_cuda(fn, x, runs: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        fn(x)
    torch.cuda.synchronize()
    ms = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(x)
        torch.cuda.synchronize()
        ms.append((time.perf_counter() - start) * 1000)
    return {
        "median_ms": round(float(np.median(ms)), 3),
        "p10_ms": round(float(np.percentile(ms, 10)), 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
    }


def _tvm_callable(lib: Path):
    """Device-resident call of a built library: tvm tensor in, tvm tensor out (no copies)."""
    import tvm

    from hyq_fx.backends.tvm_relax import TvmRunner

    runner = TvmRunner(lib, device="cuda")

    def call(x_tvm):
        return runner.vm["main"](x_tvm)

    def to_device(x: torch.Tensor):
        return tvm.runtime.tensor(x.cpu().numpy(), runner.device)

    return runner, call, to_device


def _save(out: dict[str, Any], out_dir: str) -> None:
    """Write what is measured so far (a run stopped by a time limit keeps its rows)."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "cuda.json").write_text(json.dumps(out, indent=2))


def measure(args: argparse.Namespace) -> None:
    from common import SHARED

    from hyq_fx.data import image_folder
    from hyq_fx.models import load_model

    bundle = Path(args.bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    out: dict[str, Any] = {
        "machine": {
            "gpu": torch.cuda.get_device_name(0),
            "cpu_cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "tvm_runtime_only": os.environ.get("TVM_USE_RUNTIME_LIB") == "1",
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,  # torch's defaults, unchanged
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        },
        "recipe": manifest["recipe"],
        "runs": args.runs,
        "warmup": args.warmup,
        "rows": {},
    }
    dev = torch.device("cuda")
    for name, entry in manifest["models"].items():
        mdir = bundle / name
        model, info = load_model(f"local-dir:{SHARED / 'checkpoints' / name}")
        dev_set = image_folder(SHARED / "data/cifar10/dev", info, limit=entry["limit"])
        data = np.load(mdir / "reference.npz")
        if len(dev_set) != len(data["labels"]) or dev_set.targets != data["labels"].tolist():
            raise SystemExit(f"{name}: the dev images differ from those of `prepare`")
        images = torch.stack([dev_set[i][0] for i in range(len(dev_set))])
        labels, n = data["labels"], len(dev_set)
        row: dict[str, Any] = {"model": name, "n_eval": n}
        libs = {k: mdir / f"{k}.cuda.so" for k in REFERENCE if (mdir / f"{k}.cuda.so").exists()}
        loaded, load_s = {}, {}
        for key, lib in libs.items():  # each loaded once (TVM 0.27 compiles its CUDA here)
            start = time.perf_counter()
            loaded[key] = _tvm_callable(lib)
            load_s[key] = round(time.perf_counter() - start, 1)
            print(f"{name} {key}: loaded in {load_s[key]} s", flush=True)
        for key in libs:
            ref_key = REFERENCE[key]
            runner = loaded[key][0]
            logits = np.concatenate([runner(images[i : i + 250]).numpy() for i in range(0, n, 250)])
            ref = data[ref_key][:n]
            row[key] = {
                "top1": round(100 * float((logits.argmax(1) == labels).mean()), 2),
                "reference": ref_key,
                "reference_top1": round(100 * float((ref.argmax(1) == labels).mean()), 2),
                "agreement": round(100 * float((logits.argmax(1) == ref.argmax(1)).mean()), 2),
                "max_abs_logit_diff": float(np.abs(logits - ref).max()),
                "load_seconds": load_s[key],
                "build": {
                    k: runner.meta.get(k)
                    for k in (
                        "integer_conv2d",
                        "integer_depthwise_per_channel",
                        "integer_matmul",
                        "float_fallbacks",
                        "build_seconds",
                    )
                },  # fmt: skip
            }
            print(name, key, row[key], flush=True)
        out["rows"][f"{name}|accuracy"] = row
        _save(out, args.out)

        model = model.to(dev).eval()
        variants: dict[str, Any] = {"torch_eager": model}
        if not args.no_compile:
            variants["torch_compile"] = torch.compile(model)
            variants["torch_compile_ro"] = torch.compile(model, mode="reduce-overhead")
        for batch in args.batches:
            x = images[:batch] if batch <= n else images[:1].repeat(batch, 1, 1, 1)
            x_gpu = x.to(dev)
            trow: dict[str, Any] = {"model": name, "batch": batch}
            with torch.no_grad():
                for key, fn in variants.items():
                    start = time.perf_counter()
                    fn(x_gpu)  # first call compiles
                    torch.cuda.synchronize()
                    first = time.perf_counter() - start
                    trow[key] = {**_time_cuda(fn, x_gpu, args.runs, args.warmup),
                                 "first_call_s": round(first, 2)}  # fmt: skip
            for key in libs:
                _, call, to_device = loaded[key]
                x_tvm = to_device(x)
                trow[key] = _time_cuda(call, x_tvm, args.runs, args.warmup)
            out["rows"][f"{name}|b{batch}"] = trow
            _save(out, args.out)
            print(name, batch, {k: v["median_ms"] for k, v in trow.items() if k in TIMED})


# --------------------------------------------------------------------------- report (here)
def report(args: argparse.Namespace) -> None:
    from common import RESULTS

    measured = json.loads(Path(args.measured).read_text())
    measured["device_command"] = args.device_command
    (RESULTS / "cuda.json").write_text(json.dumps(measured, indent=2))
    rows = measured["rows"]
    m = measured["machine"]
    lines = [
        "# GPU latency and accuracy: TVM CUDA (FP32, int8) vs torch eager and torch.compile",
        "",
        f"GPU: {m['gpu']}; torch {m['torch']} (CUDA {m['cuda']}), Python {m['python']}; "
        f"TVM 0.27 runtime only on the GPU machine: {m['tvm_runtime_only']}. Libraries built "
        f"on the 2-core CPU machine (`python benchmarks/cuda.py prepare`), recipe "
        f"`{measured['recipe']}` W8A8. Median of {measured['runs']} runs after "
        f"{measured['warmup']} warm-up runs, each synchronised (input already on the GPU).",
        "",
        f"torch runs with its defaults: cuDNN TF32 convolutions {m.get('cudnn_allow_tf32')}, "
        f"TF32 matmuls {m.get('matmul_allow_tf32')}. The int8 libraries run int8 × int8 → int32 "
        "kernels on CUDA cores: dlight's int8 tensor-core tensorization is off by default "
        "(`build_tvm(int8_tensor_cores=False)`: TVM 0.27 crashes on a MobileViT-v2 kernel); "
        "`tvm_int8_tc` rows, where present, are built with it. `load_seconds` is the time to "
        "load a library and set up its runner on the GPU machine (the first CUDA use in the "
        "process included). The first call of torch.compile (`first_call_s` in cuda.json) is "
        "its compile time.",
        "",
        f"Device command: `{args.device_command}`",
        "",
        f"Before it, on the CPU machine: `{args.prepare_command}`",
        "",
    ]
    for model in sorted({r["model"] for r in rows.values()}):
        timing = sorted(
            (r for r in rows.values() if r["model"] == model and "batch" in r),
            key=lambda r: r["batch"],
        )
        lines += [f"## {model}", ""]
        if timing:
            head = " | ".join(f"batch {r['batch']} ms (p10–p90)" for r in timing)
            lines += [f"| variant | {head} | speed-up vs eager |"]
            lines.append("|---|" + "---|" * len(timing) + "---|")
            for v in TIMED:
                if not all(v in r for r in timing):
                    continue
                cells = [
                    f"{r[v]['median_ms']:.2f} ({r[v]['p10_ms']:.2f}–{r[v]['p90_ms']:.2f})"
                    for r in timing
                ]
                ups = ", ".join(
                    f"b{r['batch']}: {r['torch_eager']['median_ms'] / r[v]['median_ms']:.2f}x"
                    for r in timing
                )
                lines.append(f"| {LABELS[v]} | " + " | ".join(cells) + f" | {ups} |")
        acc = rows.get(f"{model}|accuracy")
        if acc:
            lines += ["", f"On {acc['n_eval']} dev images (CIFAR-10):", ""]
            for key in (k for k in REFERENCE if k in acc):
                a = acc[key]
                lines.append(
                    f"- {LABELS[key]}: top-1 {a['top1']:.2f} vs {a['reference']} (CPU) "
                    f"{a['reference_top1']:.2f}; top-1 agreement {a['agreement']:.2f} %, largest "
                    f"logit difference {a['max_abs_logit_diff']:.2e}; loaded in "
                    f"{a.get('load_seconds')} s; build: {a['build']}"
                )
        lines.append("")
    (RESULTS / "cuda.md").write_text("\n".join(lines) + "\n")
    print((RESULTS / "cuda.md").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)
    pp = sub.add_parser("prepare", help="quantize, build CUDA libraries, write the bundle (CPU)")
    pp.add_argument("--bundle", default=".gpu-bundle")
    pp.add_argument("--models", nargs="+", default=list(MODELS))
    pp.add_argument("--recipe", default="hyq-fx")
    pp.add_argument("--calib-size", type=int, default=256)
    pp.add_argument("--limit", type=int, default=5000, help="dev images in the bundle")
    pp.add_argument("--work", default="/tmp/hyq-cuda", help="cache of quantized artifacts")
    pp.add_argument(
        "--arch",
        default="sm_90",
        help="GPU architecture to compile for (sm_90: H100); without one, TVM 0.27 stores CUDA "
        "source that the GPU machine must compile when it loads the library (nvrtc or nvcc)",
    )
    pp.add_argument(
        "--tensor-cores", action="store_true", help="also build tvm_int8_tc (int8 tensor cores)"
    )
    pm = sub.add_parser("measure", help="accuracy and latency on the GPU machine")
    pm.add_argument("--bundle", default=".gpu-bundle")
    pm.add_argument("--out", default=os.environ.get("OUT", "."))
    pm.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    pm.add_argument("--runs", type=int, default=100)
    pm.add_argument("--warmup", type=int, default=10)
    pm.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    pr = sub.add_parser("report", help="write benchmarks/results/cuda.{json,md}")
    pr.add_argument("--measured", required=True, help="cuda.json written by `measure`")
    pr.add_argument("--device-command", default="", help="the command run on the GPU machine")
    pr.add_argument(
        "--prepare-command", default="", help="the `prepare` command(s) that made the bundle"
    )
    args = p.parse_args()
    {"prepare": prepare, "measure": measure, "report": report}[args.stage](args)


if __name__ == "__main__":
    main()
