"""The ``hyq-fx`` command line: quantize, eval, inspect, recipes, demo."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .artifact import (
    OutputExistsError,
    atomic_output_dir,
    is_artifact,
    load,
    save,
    save_fit_images,
)
from .pass_base import QuantContext
from .quantize import META_KEY, quantize
from .recipes import RECIPES, RecipeError, get_recipe
from .spec import QuantSpec, QuantSpecError

# commands whose output directory is written atomically (artifact.atomic_output_dir)
_ATOMIC_OUTPUT = ("quantize", "demo")


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors that describe bad input: printed as one clear line, not a traceback."""
    from .capture import CaptureError
    from .data import DataError
    from .models import ModelLoadError
    from .pass_base import PassError
    from .quantize import CalibrationDataError
    from .serialize import SerializationError
    from .spec import QuantSpecError

    return (
        CaptureError, DataError, ModelLoadError, PassError, CalibrationDataError,
        SerializationError, QuantSpecError, RecipeError, OutputExistsError, FileNotFoundError,
        *_backend_errors(),
    )  # fmt: skip


def _backend_errors() -> tuple[type[BaseException], ...]:
    from .backends.onnx_qdq import ExportError
    from .backends.tvm_relax import TvmBackendError

    return ExportError, TvmBackendError


def _versions() -> dict[str, str]:
    import timm

    return {
        "hyq_fx": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_threads": str(torch.get_num_threads()),
    }


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _load_any(spec: str):
    """A float model (timm name, local-dir:, directory) or a saved quantized artifact."""
    from .models import load_model

    if is_artifact(spec):
        gm = load(spec)
        return gm, gm.meta[META_KEY].get("model_info", {})
    if spec.endswith(".onnx"):
        from .backends.onnx_qdq import OnnxRunner

        runner = OnnxRunner(spec)
        return runner, runner.model_info
    if spec.endswith(".so"):
        from .backends.tvm_relax import load_tvm

        return load_tvm(spec)
    return load_model(spec, pretrained=not _is_timm_name(spec))


def _is_timm_name(spec: str) -> bool:
    return not (spec.startswith(("local-dir:", "embedded:")) or Path(spec).exists())


def _eval_set(data: str, model_info: dict[str, Any], limit: int | None):
    """The labelled images to evaluate on; their classes must be the model's."""
    from .data import image_folder

    return image_folder(
        data,
        model_info,
        limit=limit,
        expected_classes=model_info.get("num_classes"),
        expected_labels=model_info.get("label_names"),
    )


def _eval(model, model_info, data, limit: int | None, progress: bool, desc: str):
    """Top-1 on ``data``: an ImageFolder path or a dataset from :func:`_eval_set`."""
    from .data import evaluate_top1, make_loader

    ds = _eval_set(data, model_info, limit) if isinstance(data, str) else data
    return evaluate_top1(model, make_loader(ds, batch_size=64), progress=progress, desc=desc)


FIT_IMAGES = 16  # calibration images kept in OUT for the onnxruntime export's grids


def _first_images(loader: Any, n: int) -> torch.Tensor:
    images, count = [], 0
    for batch in loader:
        images.append(batch[0] if isinstance(batch, (tuple, list)) else batch)
        count += len(images[-1])
        if count >= n:
            break
    return torch.cat(images)[:n]


def cmd_quantize(args: argparse.Namespace) -> int:
    from .data import image_folder, make_loader
    from .models import load_model
    from .report import layer_report

    progress = not args.no_progress
    for flag, bits in (("--w-bits", args.w_bits), ("--a-bits", args.a_bits)):
        try:
            QuantSpec(bits=bits)
        except QuantSpecError as exc:
            raise QuantSpecError(f"{flag} {bits}: {exc}") from None
    # fail fast on a bad recipe (name, JSON, pass options) before any slow work
    get_recipe(args.recipe).build(QuantContext(w_bits=args.w_bits, a_bits=args.a_bits))
    torch.manual_seed(args.seed)  # a timm name gets random weights: the same for the same seed
    model, info = load_model(args.model, pretrained=not _is_timm_name(args.model))
    calib = image_folder(args.calib, info, limit=args.calib_size, seed=args.seed)
    calib_loader = make_loader(calib, batch_size=args.batch_size)
    # checked before the slow work: an eval folder that does not fit the model fails now
    eval_set = _eval_set(args.eval, info, args.eval_limit) if args.eval else None
    out_dir = Path(args.out)
    with atomic_output_dir(out_dir, overwrite=args.overwrite) as staging:
        start = time.perf_counter()
        qgm = quantize(
            model, calib_loader, args.recipe, args.w_bits, args.a_bits,
            seed=args.seed, progress=progress,
        )  # fmt: skip
        calib_seconds = time.perf_counter() - start
        qgm.meta[META_KEY]["model_info"] = info
        first_batch = next(iter(calib_loader))[0][:8]
        report: dict[str, Any] = {
            "model": args.model,
            "architecture": info.get("architecture"),
            "recipe": qgm.meta[META_KEY]["recipe"]["name"],
            "w_bits": args.w_bits,
            "a_bits": args.a_bits,
            "seed": args.seed,
            "n_calib": len(calib),
            "calib_seconds": round(calib_seconds, 2),
            "fp32_top1": None,
            "quant_top1": None,
            "n_eval": 0,
        }
        fp = q = None
        if args.eval:
            fp = _eval(model, info, eval_set, None, progress, "eval fp32")
            q = _eval(qgm, info, eval_set, None, progress, "eval quant")
            same = sum(a == b for a, b in zip(fp["predictions"], q["predictions"], strict=True))
            report.update(
                fp32_top1=round(fp["top1"] * 100, 2),
                quant_top1=round(q["top1"] * 100, 2),
                drop=round((fp["top1"] - q["top1"]) * 100, 2),
                agreement=round(same / max(fp["n"], 1) * 100, 2),
                n_eval=fp["n"],
            )
        report["layers"] = layer_report(qgm, first_batch)
        report["versions"] = _versions()
        save(qgm, staging)
        save_fit_images(_first_images(calib_loader, FIT_IMAGES), staging)
        (staging / "report.json").write_text(json.dumps(report, indent=2))
        if args.report:
            from .report_md import write_report_md

            preds = (fp["predictions"], q["predictions"]) if fp and q else (None, None)
            write_report_md(staging, report, qgm, first_batch, *preds, info.get("label_names"))
    summary = {k: v for k, v in report.items() if k not in ("layers", "versions")}
    summary["out"] = str(out_dir)
    _print_json(summary)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    model, info = _load_any(args.model)
    result = _eval(model, info, args.data, args.limit, not args.no_progress, "eval")
    _print_json({"model": args.model, "top1": round(result["top1"] * 100, 2), "n": result["n"]})
    return 0


_ORT_FLAGS = ("calib", "requantize", "max_added_error", "ort_contrib_ops", "token_layout")


def cmd_export(args: argparse.Namespace) -> int:
    if not is_artifact(args.out):
        raise FileNotFoundError(
            f"{args.out} is not a quantized model directory (no graph.json); create one with "
            "`hyq-fx quantize MODEL --calib DIR --out OUT`"
        )
    if args.bundle and not (args.to == "tvm" and args.target.startswith("aarch64")):
        from .backends.tvm_relax import TvmBackendError

        raise TvmBackendError("--bundle goes with --to tvm --target aarch64")
    if args.to != "onnxruntime":
        given = [f"--{f.replace('_', '-')}" for f in _ORT_FLAGS if getattr(args, f) is not None]
        if given:
            from .backends.onnx_qdq import ExportError

            raise ExportError(
                f"{', '.join(given)} shape the onnxruntime-tuned file: use --to onnxruntime "
                f"(--to {args.to} writes {'a portable QDQ file' if args.to == 'onnx' else 'TVM'})"
            )
    if args.to == "onnx":
        from .backends.onnx_export import export_onnx_artifact

        path = export_onnx_artifact(args.out)
    elif args.to == "onnxruntime":
        from .backends.onnx_qdq import export_artifact

        path = export_artifact(
            args.out,
            Path(args.out) / "model.ort.onnx",
            calib_dir=args.calib,
            requantize=args.requantize or "auto",
            ort_contrib_ops=True if args.ort_contrib_ops is None else args.ort_contrib_ops,
            max_added_error=1.0 if args.max_added_error is None else args.max_added_error,
            token_layout=args.token_layout or "auto",
        )
    else:
        from .backends.tvm_relax import export_tvm

        path = export_tvm(
            args.out,
            args.target,
            batch=args.batch,
            tune_trials=args.tune_trials,
            tune_ops=args.tune_ops,
            vnni=args.vnni,
            channels_last=args.channels_last,
        )
        if args.bundle:
            from .backends.tvm_deploy import write_bundle

            write_bundle(path, args.bundle)
    _print_json({"out": str(path), "bytes": path.stat().st_size, "to": args.to})
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .capture import capture
    from .draw import draw_graph, require_dot
    from .graph import propagate_shapes, summarize

    if args.svg:
        require_dot()  # before the slow capture
    model, info = _load_any(args.model)
    size = tuple(info.get("pretrained_cfg", {}).get("input_size") or (3, 224, 224))
    example = torch.randn(2, *size)
    if is_artifact(args.model):
        gm = propagate_shapes(model, example)  # a loaded graph carries no shapes
    else:
        gm = capture(model, example)
    summary = summarize(gm)
    _print_json({"model": args.model, **summary})
    if args.dot or args.svg:
        for path in draw_graph(gm, dot=args.dot, svg=args.svg, title=args.model):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    if args.json:
        _print_json([r.to_dict() for r in RECIPES.values()])
        return 0
    width = max(len(n) for n in RECIPES)
    for name, recipe in sorted(RECIPES.items()):
        print(f"{name:<{width}}  {recipe.description}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _print_json(run_demo(args.out, steps=args.steps, progress=not args.no_progress))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyq-fx",
        description="Post-training quantization of hybrid CNN-Transformer models with torch.fx.",
    )
    parser.add_argument("--version", action="version", version=f"hyq-fx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and write OUT/report.json")
    q.add_argument("model", help="timm name, local-dir:PATH, or a dir with config.json")
    q.add_argument("--calib", required=True, help="ImageFolder of calibration images")
    q.add_argument("--eval", help="ImageFolder to measure FP32 and quantized top-1 on")
    q.add_argument(
        "--recipe", default="hyq-fx", help="recipe name or JSON file (see: hyq-fx recipes)"
    )
    q.add_argument("--w-bits", type=int, default=8)
    q.add_argument("--a-bits", type=int, default=8)
    q.add_argument("--calib-size", type=int, default=256, help="calibration images (default 256)")
    q.add_argument("--eval-limit", type=int, help="evaluate on a class-balanced subset")
    q.add_argument("--batch-size", type=int, default=32)
    q.add_argument("--out", default="hyq-out", help="output directory (default hyq-out)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--report", action="store_true", help="also write OUT/report.md with plots")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="top-1 of a model or a quantized OUT dir, as JSON")
    e.add_argument(
        "model", help="timm name, local-dir:PATH, model dir, quantize --out dir, .onnx or .so"
    )
    e.add_argument("--data", required=True, help="ImageFolder of labelled images")
    e.add_argument("--limit", type=int)
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser(
        "export",
        help="lower a quantized OUT dir to ONNX (portable QDQ, or tuned for onnxruntime) or TVM",
    )
    x.add_argument("out", help="a directory written by hyq-fx quantize --out")
    x.add_argument(
        "--to",
        choices=("onnx", "onnxruntime", "tvm"),
        required=True,
        help="onnx: OUT/model.qdq.onnx, standard QDQ operators only, by torch.onnx (any "
        "runtime); onnxruntime: OUT/model.ort.onnx, requantized int8 convs (QLinearConv) and "
        "onnxruntime's contrib ops, its fastest file; tvm: a Relax VM library (--target)",
    )
    x.add_argument(
        "--target",
        choices=("llvm", "aarch64", "aarch64-i8mm", "cuda"),
        default="llvm",
        help="tvm: llvm (this CPU), aarch64 (Armv8.2 +dotprod: int8 convs/matmuls on sdot, "
        "Cortex-A76-class phones), aarch64-i8mm (+i8mm, Armv8.6/Armv9), cuda (sm_90)",
    )
    x.add_argument(
        "--calib",
        help="onnxruntime: ImageFolder to fit requantization grids (default: the images "
        "hyq-fx quantize kept in OUT)",
    )
    x.add_argument(
        "--requantize",
        choices=("none", "exact", "auto"),
        help="onnxruntime: auto (default) = conv outputs requantized so onnxruntime runs "
        "QLinearConv; exact = only where that is exact; none = the fake-quant graph as is",
    )
    x.add_argument(
        "--max-added-error",
        type=float,
        help="onnxruntime, --requantize auto: requantize a conv in front of a per-channel "
        "quantizer, or one added to a residual, only if that adds at most this fraction to the "
        "quantizer's error (default 1.0)",
    )
    x.add_argument(
        "--no-ort-contrib-ops",
        dest="ort_contrib_ops",
        action="store_false",
        default=None,
        help="onnxruntime: keep SiLU as Sigmoid·x and linear layers as MatMul + Add (default: "
        "com.microsoft.QuickGelu and MatMulIntegerToFloat with the bias inside, and SiLU on "
        "uint8 codes behind a requantized conv: faster in onnxruntime)",
    )
    x.add_argument(
        "--token-layout",
        choices=("auto", "channels_first", "channels_last"),
        help="onnxruntime: MobileViTv2's transformer tokens channels-last, its 1x1 convs as "
        "integer matrix products (auto, default: when the weights are int8)",
    )
    x.add_argument(
        "--tune-trials",
        type=int,
        default=None,
        help="tvm llvm: MetaSchedule trials on this CPU (database in OUT/model.llvm.tuning; "
        "builds for --batch only; 0 applies that database without searching)",
    )
    x.add_argument(
        "--tune-ops",
        nargs="+",
        default=["conv2d", "matmul"],
        help="tvm: with --tune-trials, tune the fused kernels holding these ops ('all': every "
        "kernel, elementwise and softmax ones too); a rerun tunes kernels without a record first",
    )
    x.add_argument(
        "--no-vnni",
        dest="vnni",
        action="store_false",
        help="tvm llvm: keep int8 × int8 conv/matmul kernels on an AVX-512 VNNI CPU (default: "
        "uint8 × int8 VNNI kernels, same results; a database tuned without them needs this)",
    )
    x.add_argument(
        "--no-channels-last",
        dest="channels_last",
        action="store_false",
        help="tvm llvm/aarch64: keep the convs NCHW as captured (default: NHWC, so that their "
        "per-channel epilogues vectorize; same results; a database tuned NCHW needs this)",
    )
    x.add_argument("--batch", type=int, default=1, help="tvm: batch size a tuned library runs")
    x.add_argument(
        "--bundle",
        metavar="DIR",
        help="tvm --target aarch64: also write DIR for an ARM Linux board: the library, a C++ "
        "runner (source, Makefile, prebuilt), TVM's aarch64 runtime and a README",
    )
    x.set_defaults(func=cmd_export)

    i = sub.add_parser("inspect", help="norm variants, conv→transformer transitions, op counts")
    i.add_argument("model")
    i.add_argument("--dot", help="also write the graph as Graphviz DOT (norms, bridges coloured)")
    i.add_argument("--svg", help="also render the graph to SVG (needs Graphviz's `dot`)")
    i.set_defaults(func=cmd_inspect)

    r = sub.add_parser("recipes", help="list the recipes")
    r.add_argument("--json", action="store_true", help="print the recipes as JSON")
    r.set_defaults(func=cmd_recipes)

    d = sub.add_parser("demo", help="quantize the bundled MobileViT-XXS data-free")
    d.add_argument("--out", help="also save the quantized model here")
    d.add_argument("--steps", type=int, default=None, help="synthesis steps (default: tuned)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)
    return parser


def _one_line(text: object) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _warning_printer(command: str):
    """hyq-fx's own warnings (skipped images) as one ``hyq-fx CMD: warning: ...`` line."""
    from .data import DataWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, DataWarning):
            print(f"hyq-fx {command}: warning: {_one_line(message)}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _warning_printer(args.command)
        try:
            return args.func(args)
        except _user_errors() as exc:
            print(f"hyq-fx {args.command}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            done = "; no output was written" if args.command in _ATOMIC_OUTPUT else ""
            print(f"hyq-fx {args.command}: interrupted{done}", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
