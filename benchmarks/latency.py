"""Latency benchmark: torch FP32, ONNX Runtime FP32 and int8 QDQ models, batch 1 and 32, on CPU.

For each shared CIFAR-10 checkpoint it quantizes with hyq-fx (``--recipe``, W8A8, cached in
``--work``), exports

* ``ort_fp32``: the float graph (every quantizer off) through the same ONNX translator;
* ``ort_qdq_auto`` (ours): ``export_onnx_qdq(requantize="auto")``, conv outputs requantized so
  ONNX Runtime runs ``QLinearConv``; linears/attention matmuls run ``MatMulIntegerToFloat``;
* ``ort_qdq_auto_ms`` (ours): the same with ``ort_contrib_ops=True`` (SiLU written as ONNX
  Runtime's ``com.microsoft.QuickGelu``, and behind a requantized conv as ``QLinearSigmoid`` +
  ``QLinearMul`` on the uint8 codes, since session 7);
* ``ort_qdq_exact`` (ours): ``requantize="none"``, the exact fake-quant graph (float convs);
* ``ort_static`` (with ``--ort-static``): ONNX Runtime's own ``quantize_static`` of the FP32
  ONNX (QDQ, per-channel int8 weights, uint8 min-max activations, same calibration images),

and times every variant *interleaved* (one run of each per round, ``--runs`` rounds, after
``--warmup`` rounds), so that load from other processes hits all variants alike; the median,
p10 and p90 are reported with the load average. With ``--eval-limit N`` it also measures top-1
of each variant and of the fake-quant GraphModule on N dev images. Writes
``benchmarks/results/latency.{json,md}``; rows are saved as they finish (a rerun resumes).

    python benchmarks/latency.py                                   # both models, batch 1 and 32
    python benchmarks/latency.py --models mobilevit_xxs.cifar10 --batches 1 32 --runs 20 \\
        --eval-limit 1000 --ort-static
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RESULTS,
    SHARED,
    ResultStore,
    command_line,
    load_quantized,
    machine,
    markdown_header,
)

from hyq_fx.backends.onnx_qdq import OnnxRunner, export_onnx_qdq, onnx_node_counts  # noqa: E402
from hyq_fx.data import evaluate_top1, image_folder, make_loader  # noqa: E402
from hyq_fx.quantize import quantizers_mode  # noqa: E402

MODELS = ("mobilevit_xxs.cifar10", "mobilevitv2_050.cifar10")
VARIANTS = (
    "torch_fp32", "ort_fp32", "ort_qdq_auto", "ort_qdq_auto_ms", "ort_qdq_exact", "ort_static",
    "tvm_fp32", "tvm_int8", "tvm_int8_tuned",
)  # fmt: skip
LABELS = {
    "torch_fp32": "torch FP32 eager",
    "ort_fp32": "onnxruntime FP32",
    "ort_qdq_auto": "onnxruntime QDQ int8, ours (requantize=auto: QLinearConv)",
    "ort_qdq_auto_ms": "onnxruntime QDQ int8, ours (auto + contrib ops: SiLU on uint8 codes)",
    "ort_qdq_exact": "onnxruntime QDQ int8, ours (requantize=none: exact fake-quant)",
    "ort_static": "onnxruntime quantize_static (QDQ, per-channel, min-max)",
    "tvm_fp32": "TVM Relax FP32, llvm, untuned (default schedules)",
    "tvm_int8": "TVM Relax int8 conv/matmul (IntegerizeQDQ), llvm, untuned",
    "tvm_int8_tuned": "TVM Relax int8, llvm, MetaSchedule-tuned conv/matmul (batch-1 library)",
    "fake_quant": "hyq-fx fake-quant GraphModule (reference)",
}


def _threads() -> int:
    return len(os.sched_getaffinity(0))


def prepare(name: str, args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], dict]:
    """Quantize (cached), export the ONNX variants; returns callables and model info."""
    model, info, calib_ds, qgm = load_quantized(name, args.recipe, args.calib_size, work)
    calib = torch.stack([calib_ds[i][0] for i in range(32)])  # fits the requant grids
    example = calib[:2]
    paths = {
        "ort_qdq_auto": work / f"{name}.qdq_auto.onnx",
        "ort_qdq_auto_ms": work / f"{name}.qdq_auto_ms.onnx",
        "ort_qdq_exact": work / f"{name}.qdq_exact.onnx",
        "ort_fp32": work / f"{name}.fp32.onnx",
    }
    export_s = {}
    for key, requantize, contrib in (
        ("ort_qdq_auto", "auto", False),
        ("ort_qdq_auto_ms", "auto", True),
        ("ort_qdq_exact", "none", False),
    ):
        start = time.perf_counter()
        export_onnx_qdq(
            qgm, paths[key], example, requantize=requantize, calib=calib, ort_contrib_ops=contrib
        )
        export_s[key] = time.perf_counter() - start
    with quantizers_mode(qgm, "off"):
        export_onnx_qdq(qgm, paths["ort_fp32"], example)
    if args.ort_static:
        paths["ort_static"] = work / f"{name}.ort_static.onnx"
        if not paths["ort_static"].exists():
            ort_quantize_static(paths["ort_fp32"], paths["ort_static"], calib_ds)
    runners: dict[str, Any] = {"torch_fp32": model.eval()}
    nodes = {}
    if args.tvm or args.tune_trials:
        from hyq_fx.backends.tvm_relax import TvmRunner, build_tvm
    if args.tvm:  # built once per model and cached in --work
        for key, integer in (("tvm_fp32", False), ("tvm_int8", True)):
            lib = work / f"{name}.{args.recipe}.{key}.so"
            if not lib.exists():
                start = time.perf_counter()
                build_tvm(qgm, example, "llvm", lib, integer=integer)
                export_s[key] = time.perf_counter() - start
            runners[key] = TvmRunner(lib)
            paths[key] = lib
    if args.tune_trials:  # static batch 1 (tuning needs static shapes); database beside it
        lib = work / f"{name}.{args.recipe}.tvm_int8_tuned_b1.so"
        has_database = lib.with_suffix(".tuning").is_dir()
        if not lib.exists() or args.tune_resume:
            # a database beside it (an earlier or interrupted tuning) is applied, not re-tuned,
            # unless --tune-resume adds the trials to it
            trials = args.tune_trials if args.tune_resume or not has_database else 0
            start = time.perf_counter()
            build_tvm(
                qgm,
                example[:1],
                "llvm",
                lib,
                dynamic_batch=False,
                tune_trials=trials,
                tune_ops=args.tune_ops,
            )
            export_s["tvm_int8_tuned"] = time.perf_counter() - start
        runners["tvm_int8_tuned"] = TvmRunner(lib)
        paths["tvm_int8_tuned"] = lib
    for key, path in paths.items():
        if key.startswith("tvm_"):
            continue
        opt = path.with_suffix(".opt.onnx")
        runners[key] = OnnxRunner(path, threads=args.threads, optimized_model_path=opt)
        nodes[key] = onnx_node_counts(opt)
    extra = {
        "info": info,
        "qgm": qgm,
        "sizes": {k: p.stat().st_size for k, p in paths.items()},
        "export_s": export_s,
        "nodes": nodes,
        "report": runners["ort_qdq_auto"].export_report,
        "tvm_tuning": getattr(runners.get("tvm_int8_tuned"), "meta", {}).get("tuning"),
    }
    return runners, extra


def ort_quantize_static(fp32: Path, out: Path, calib_ds) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(range(len(calib_ds)))

        def get_next(self):
            i = next(self.items, None)
            return None if i is None else {"input": calib_ds[i][0][None].numpy()}

    quantize_static(
        str(fp32),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


def time_interleaved(
    runners: dict[str, Any], batch: int, size, runs: int, warmup: int, torch_runs: int
):
    """Per round, one run of each variant; torch eager only in the first ``torch_runs`` rounds
    (it is 10-50x slower than ONNX Runtime here and would dominate the benchmark's time)."""
    x = torch.randn(batch, *size, generator=torch.Generator().manual_seed(0))
    # a static-batch library (the tuned one) is timed at its own batch size only
    runners = {k: fn for k, fn in runners.items() if getattr(fn, "batch", None) in (None, batch)}
    times: dict[str, list[float]] = {k: [] for k in runners}
    with torch.no_grad():
        for r in range(warmup + runs):
            for key, fn in runners.items():
                if key == "torch_fp32" and not (1 <= r < 1 + torch_runs):
                    continue
                start = time.perf_counter()
                fn(x)
                if r >= warmup or key == "torch_fp32":
                    times[key].append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--runs", type=int, default=20, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--torch-runs", type=int, default=5, help="timed runs of torch eager")
    p.add_argument("--threads", type=int, default=None, help="default: the usable cores")
    p.add_argument("--recipe", default="minmax")
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--eval-limit", type=int, default=0, help="top-1 on N dev images (0: skip)")
    p.add_argument("--ort-static", action="store_true", help="add onnxruntime quantize_static")
    p.add_argument("--tvm", action="store_true", help="add TVM llvm FP32 and int8 builds")
    p.add_argument(
        "--tune-trials",
        type=int,
        default=0,
        help="add a MetaSchedule-tuned TVM int8 library (batch 1) with this trial budget",
    )
    p.add_argument(
        "--tune-resume",
        action="store_true",
        help="with --tune-trials: spend the trials on top of the database already in --work "
        "(and rebuild the tuned library) instead of applying that database as it is",
    )
    p.add_argument(
        "--tune-ops",
        nargs="+",
        default=["conv2d", "matmul"],
        help="with --tune-trials: tune the fused kernels holding these ops ('all': every kernel)",
    )
    p.add_argument("--work", default="/tmp/hyq-latency", help="cache of artifacts and .onnx")
    p.add_argument("--out", default=str(RESULTS / "latency"), help="results path stem")
    p.add_argument("--fresh", action="store_true", help="ignore rows saved by an earlier run")
    args = p.parse_args()
    args.threads = args.threads or _threads()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))  # TVM's pool reads it at load
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    if args.fresh:  # rows are merged with the file on every save: start from no file
        Path(args.out + ".json").unlink(missing_ok=True)
    store = ResultStore(Path(args.out + ".json"))
    store.data["machine"] = {**machine(), "threads": args.threads}
    store.data["command"] = command_line()
    for name in args.models:
        runners, extra = prepare(name, args, work)
        size = tuple(extra["info"]["pretrained_cfg"]["input_size"])
        store.put(
            f"{name}|meta",
            {
                "model": name,
                "sizes": extra["sizes"],
                "export_s": {k: round(v, 2) for k, v in extra["export_s"].items()},
                "optimized_nodes": extra["nodes"],
                "requantized_convs": len(extra["report"].get("requantized", [])),
                "float_convs": len(extra["report"].get("float_convs", [])),
                "tvm_tuning": extra["tvm_tuning"],
            },
        )
        for batch in args.batches:
            key = f"{name}|b{batch}|{args.threads}t"
            if store.has(key):
                continue
            load0 = os.getloadavg()[0]
            times = time_interleaved(runners, batch, size, args.runs, args.warmup, args.torch_runs)
            row: dict[str, Any] = {
                "model": name,
                "batch": batch,
                "threads": args.threads,
                "runs": args.runs,
                "torch_runs": args.torch_runs,
                "load_avg": [round(load0, 1), round(os.getloadavg()[0], 1)],
            }
            for v, ts in times.items():
                ms = np.asarray(ts) * 1000
                row[v] = {
                    "median_ms": round(float(np.median(ms)), 2),
                    "p10_ms": round(float(np.percentile(ms, 10)), 2),
                    "p90_ms": round(float(np.percentile(ms, 90)), 2),
                }
            store.put(key, row)
            print({k: v for k, v in row.items()}, flush=True)
        if args.eval_limit:
            evaluate(name, runners, extra, args, store)
    write_markdown(store, Path(args.out + ".md"))


def evaluate(name, runners, extra, args, store) -> None:
    dev_dir = SHARED / "data" / "cifar10" / "dev"
    dev = make_loader(image_folder(dev_dir, extra["info"], limit=args.eval_limit), batch_size=100)
    key = f"{name}|top1|{args.eval_limit}"
    row = store.get(key) if store.has(key) else {"model": name, "n_eval": args.eval_limit}
    preds = row.pop("_predictions", {})
    for v, fn in [("fake_quant", extra["qgm"]), *runners.items()]:
        if v in row or v == "torch_fp32":  # torch FP32 = ORT FP32 up to 1e-6; eval it once there
            continue
        result = evaluate_top1(fn, dev, progress=False, desc=f"{name} {v}")
        row[v] = round(result["top1"] * 100, 2)
        preds[v] = result["predictions"]
        store.put(key, {**row, "_predictions": preds})
        print(name, v, row[v], flush=True)
    ref = preds.get("fake_quant")
    if ref:
        row["agreement_with_fake_quant"] = {
            v: round(100 * np.mean([a == b for a, b in zip(p, ref, strict=True)]), 2)
            for v, p in preds.items()
        }
    store.put(key, {**row, "_predictions": preds})


def write_markdown(store: ResultStore, path: Path) -> None:
    rows = store.data["rows"]
    lines = markdown_header(
        "Latency: onnxruntime FP32 vs int8 QDQ on CPU (median of interleaved runs)", store.data
    )
    for model in sorted({r["model"] for r in rows.values()}):
        timing = [r for r in rows.values() if r["model"] == model and "batch" in r]
        meta = rows.get(f"{model}|meta", {})
        if timing:
            batches = sorted({(r["batch"], r["threads"]) for r in timing})
            lines += [f"## {model}", ""]
            header = " | ".join(f"batch {b} ({t} thr) ms" for b, t in batches)
            lines += [f"| variant | {header} | speed-up vs ORT FP32 | file MB |"]
            lines.append("|---|" + "---|" * len(batches) + "---|---|")
            for v in VARIANTS:
                cells, ups = [], []
                for b, t in batches:
                    r = next(x for x in timing if (x["batch"], x["threads"]) == (b, t))
                    if v not in r:
                        cells.append("—")
                        continue
                    med = r[v]["median_ms"]
                    cells.append(f"{med:.1f} ({r[v]['p10_ms']:.0f}–{r[v]['p90_ms']:.0f})")
                    ups.append(f"b{b}: {r['ort_fp32']['median_ms'] / med:.2f}x")
                if all(c == "—" for c in cells):
                    continue
                mb = meta.get("sizes", {}).get(v)
                lines.append(
                    f"| {LABELS[v]} | "
                    + " | ".join(cells)
                    + f" | {', '.join(ups)} | "
                    + (f"{mb / 1e6:.2f}" if mb else "—")
                    + " |"
                )
            loads = ", ".join(f"b{r['batch']}: {r['load_avg']}" for r in timing)
            lines += ["", f"Load average (1 min) at start/end of each timing block: {loads}."]
        if meta:
            lines += [
                "",
                f"Requantized convs (QLinearConv): {meta.get('requantized_convs')}, float convs: "
                f"{meta.get('float_convs')}; export seconds: {meta.get('export_s')}.",
            ]
            for v, counts in meta.get("optimized_nodes", {}).items():
                top = ", ".join(f"{k} {n}" for k, n in list(counts.items())[:12])
                lines.append(f"- ORT-optimized graph, {v}: {top}")
            tuning = meta.get("tvm_tuning")
            if tuning:
                searched = (
                    f"{tuning['trials']} trials over {tuning.get('tasks')} conv/matmul kernels "
                    f"({tuning.get('trials_per_task')} per kernel at most, cost model "
                    f"{tuning.get('cost_model')}) in {tuning.get('tune_seconds')} s"
                    if tuning.get("trials")
                    else f"built from an earlier tuning's database ({tuning['records']} records)"
                )
                lines.append(
                    f"- TVM MetaSchedule: {searched}; {tuning.get('kernels_from_database')} of "
                    f"{tuning.get('kernels')} fused kernels scheduled from the database, the rest "
                    "untuned"
                )
        acc = [r for r in rows.values() if r.get("model") == model and "n_eval" in r]
        for r in acc:
            lines += ["", f"Top-1 on {r['n_eval']} dev images (agreement with fake-quant, %):", ""]
            agree = r.get("agreement_with_fake_quant", {})
            for v in ("fake_quant", *VARIANTS):
                if v in r:
                    lines.append(
                        f"- {LABELS[v]}: {r[v]:.2f}" + (f" ({agree[v]:.1f})" if v in agree else "")
                    )
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
