"""Which timm architectures deploy: quantize → ONNX → ONNX Runtime, and → TVM llvm.

Each architecture is built with timm's random initialisation (seed 0) at its default input
size, its BatchNorm statistics settled on 64 real images of the ImageNet sample in
``../shared``, quantized with ``--recipe`` (default ``minmax`` W8A8) on 32 other images, and
taken through :func:`hyq_fx.deploy_check.check_deploy`: the portable ONNX export in ONNX
Runtime and the TVM llvm library (LLVM -O0: a coverage check, not a speed figure), each
compared with the fake-quant model on 8 further images at batch 1 (4 images, one at a time)
and batch 8.

    python benchmarks/zoo.py                                   # every architecture
    python benchmarks/zoo.py --models levit_128s fastvit_t8    # a few
    python benchmarks/zoo.py --backends onnx --limit 5         # ONNX only, first 5 not done

Rows are saved one by one to ``benchmarks/results/zoo.json``; a rerun runs only the
architectures and backends without a result (``--redo``: all again), and the table goes to
``zoo.md``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, SHARED, ResultStore, command_line, machine, markdown_header
from torch.utils.data import DataLoader, Subset

from hyq_fx.data import image_folder
from hyq_fx.deploy_check import MIN_SQNR_DB, check_deploy, settle_batchnorm
from hyq_fx.models import load_model

ARCHITECTURES = [
    "mobilevit_xxs", "mobilevit_s", "mobilevitv2_050", "mobilevitv2_100", "efficientformer_l1",
    "efficientformerv2_s0", "efficientformerv2_s1", "edgenext_xx_small", "edgenext_x_small",
    "fastvit_t8", "fastvit_sa12", "fastvit_mci0", "levit_128s", "levit_conv_128s",
    "repvit_m0_9", "mobilenetv4_hybrid_medium", "tiny_vit_5m_224", "efficientvit_m0",
    "efficientvit_b0", "coat_lite_tiny", "nextvit_small", "mobile_former_26m",
    "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "pvt_v2_b0", "mobileone_s0",
    "resnet18", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto",
]  # fmt: skip
SETTLE, CALIB, EVAL = 64, 32, 8
TVM_TARGET = {"kind": "llvm", "opt-level": 0}  # LLVM -O0: the same numerics, built faster
BACKENDS = (
    "onnx",
    "torch_integer",
    "onnx_fp32",
    "openvino",
    "tvm",
)  # openvino: `pip install openvino`


def images_for(info: dict) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Disjoint settling batches, calibration batches and evaluation images of the sample."""
    data = image_folder(SHARED / "data" / "imagenet-sample", info)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    parts = [order[:SETTLE], order[SETTLE : SETTLE + CALIB], order[SETTLE + CALIB :][:EVAL]]
    settle, calib, evaluation = ([x for x, _ in DataLoader(Subset(data, p), 16)] for p in parts)
    return settle, calib, torch.cat(evaluation)


def run_one(name: str, recipe: str, backends: tuple[str, ...]) -> dict:
    start = time.perf_counter()
    torch.manual_seed(0)
    model, info = load_model(name, pretrained=False)
    settle, calib, evaluation = images_for(info)
    model = settle_batchnorm(model, settle)
    with tempfile.TemporaryDirectory() as work:
        row = check_deploy(
            model, calib, evaluation, work, recipe=recipe, backends=backends, tvm_target=TVM_TARGET
        )
    row.update(
        model=name,
        input_size=list(info["pretrained_cfg"]["input_size"]),
        params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        total_seconds=round(time.perf_counter() - start, 1),
    )
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=ARCHITECTURES)
    p.add_argument("--recipe", default="minmax")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    p.add_argument("--limit", type=int, help="run at most this many architectures not yet done")
    p.add_argument("--redo", action="store_true", help="run again architectures already done")
    p.add_argument("--out", default=str(RESULTS / "zoo"), help="results path stem")
    args = p.parse_args()
    store = ResultStore(Path(args.out + ".json"))
    store.data.update(machine=machine(), command=command_line())
    todo = {m: _missing(store, f"{m}|{args.recipe}", args.backends, args.redo) for m in args.models}
    todo = {m: backends for m, backends in todo.items() if backends}
    for name in list(todo)[: args.limit]:
        key = f"{name}|{args.recipe}"
        row = run_one(name, args.recipe, todo[name])
        store.put(key, {**(store.get(key) if store.has(key) else {}), **row})
        print(summary_line(store.get(key)), flush=True)
    write_markdown(store, Path(args.out + ".md"))


def _missing(store: ResultStore, key: str, backends: list[str], redo: bool) -> tuple[str, ...]:
    """The backends a row still lacks (all of them with ``--redo``)."""
    row = store.get(key) if store.has(key) and not redo else {}
    return tuple(b for b in backends if b not in row)


def _cell(step: dict | None) -> str:
    if step is None:
        return "—"
    if "error" in step:
        return f"failed: {step['error'][:90]}"
    if "passed" not in step:  # the float export: translation error alone
        return f"{step['sqnr_db']:.0f} dB, max {step['max_abs']:.1e}"
    return (
        f"{'ok' if step['passed'] else 'MISMATCH'} "
        f"{step['sqnr_b1_db']:.0f}/{step['sqnr_bn_db']:.0f} dB, "
        f"{step['agree_b1']}/{step['n_b1']}, {step['agree_bn']}/{step['n_bn']}"
        f" ({step['seconds']:.0f} s)"
    )


def summary_line(row: dict) -> str:
    q = row.get("quantize", {})
    fq = q.get("error") or f"{q.get('sqnr_vs_fp32_db', float('nan')):.1f} dB"
    runtimes = " | ".join(f"{b} {_cell(row.get(b))}" for b in BACKENDS)
    return f"{row['model']}: quantize {fq} | {runtimes}"


def write_markdown(store: ResultStore, path: Path) -> None:
    rows = sorted(store.data["rows"].values(), key=lambda r: ARCHITECTURES.index(r["model"])
                  if r["model"] in ARCHITECTURES else len(ARCHITECTURES))  # fmt: skip
    passed = {b: sum(1 for r in rows if r.get(b, {}).get("passed")) for b in BACKENDS}
    lines = [
        *markdown_header(
            "Deploy coverage: timm architectures through ONNX Runtime and TVM", store.data
        ),
        "Random-init weights (timm, seed 0), BatchNorm statistics settled on 64 ImageNet-sample "
        "images, W8A8 on 32 other images. A runtime cell: ok when the logit SQNR against the "
        f"fake-quant model is ≥ {MIN_SQNR_DB:.0f} dB at batch 1 and batch 8 and top-1 agrees on "
        "at least 3 of 4 images; then SQNR batch 1 / batch 8, top-1 agreement at batch 1 and "
        "batch 8, and the export + build seconds. `fake-quant` is the quantized model's logit "
        "SQNR against FP32 (random weights: a check that the recipe runs, not accuracy). "
        "`torch integer graph` runs the integer graph (quantize/dequantize ops) in torch: "
        "torch's reference quantize multiplies by 1/s where fake-quant divides, so it differs "
        "only in codes within float rounding of a tie, and its SQNR is the floor a runtime can "
        "reach on that network. "
        "`OpenVINO` runs the same portable file in OpenVINO's CPU runtime (f32 precision hint). "
        "`ONNX FP32` exports the same graph with every quantizer off and compares ONNX Runtime "
        "with torch (SQNR, max |Δ| of the logits): the op translation alone. Where the "
        "fake-quant SQNR is low the random network is sensitive, and one-step code flips from "
        "float rounding differences grow with it.",
        "",
        f"ONNX Runtime ok: {passed['onnx']} of {len(rows)}; OpenVINO ok: {passed['openvino']}; "
        f"TVM llvm ok: {passed['tvm']}.",
        "",
        "| model | input | params (M) | fake-quant vs FP32 | quantize s | ONNX Runtime "
        "| torch integer graph | ONNX FP32 | OpenVINO | TVM llvm |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        q = r.get("quantize", {})
        fq = f"failed: {q['error'][:90]}" if "error" in q else f"{q['sqnr_vs_fp32_db']:.1f} dB"
        size = "x".join(str(d) for d in r["input_size"][1:])
        lines.append(
            f"| {r['model']} | {size} | {r['params_m']} | {fq} | {q.get('seconds', 0):.0f} | "
            f"{_cell(r.get('onnx'))} | {_cell(r.get('torch_integer'))} | "
            f"{_cell(r.get('onnx_fp32'))} | "
            f"{_cell(r.get('openvino'))} | {_cell(r.get('tvm'))} |"
        )
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
