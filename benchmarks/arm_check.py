"""The shared CIFAR-10 checkpoints as aarch64 TVM libraries, run under qemu on this x86 host.

For each checkpoint (``--models``; default both), quantized W8A8 with ``--recipe`` (default
``hyq-fx``, 256 calibration images, cached in ``--work``):

1. builds two aarch64 libraries with a dynamic batch (``build_tvm(..., "aarch64", ...)``):
   the int8 one (int8 conv2d / matmul with constant weights as Armv8.2 ``sdot``,
   ``backends/tvm_arm_dot.py``) and the FP32 one (``integer=False``: quantizers off);
2. runs the int8 library under ``qemu-aarch64`` (the C++ Relax VM runner of
   ``backends/tvm_deploy.py``) on ``--limit`` dev images (a class-balanced subset, seed 0) in
   batches of ``--batch``,
   and compares its logits with the fake-quant model's: top-1 agreement, largest
   ``|Δ logit|`` and the top-1 accuracy of both against the labels;
3. a cost proxy for each library (not a timing; qemu's speed says nothing about an ARM CPU):

   * static: ``aarch64-linux-gnu-objdump -d`` of each compute kernel (``kernel_instructions``):
     instructions, dot products (``sdot``/``udot``/``usdot``/``smmla``/...) and multiplies
     (``madd``/``msub``/``mul``/``smull``/``smlal``/..., scalar or vector: the mnemonic only)
     in the conv2d / matmul kernels, and the totals of all kernels;
   * executed, if a qemu TCG plugin counts instructions (``--plugin``; ``auto``: an installed
     ``libinsn.so``, else a small counter compiled here with ``cc`` for qemu's plugin API v1,
     qemu 7.x / 8.x): the instructions of one batch-1 inference, the difference between a run of
     the runner with ``--repeat 2`` and one with ``--repeat 1`` (so loading the library and the
     first-run allocations drop out), and of those the dot products and multiplies.

Libraries, logits and the plugin are kept in ``--work`` (default ``/tmp/arm_check``), so an
interrupted run resumes batch by batch; finished checkpoints are rows of
``benchmarks/results/arm_check.json`` (``--out``; ``--redo`` recomputes them) and the table goes
to ``arm_check.md``.

    python benchmarks/arm_check.py --limit 20                       # a quick check
    python benchmarks/arm_check.py                                  # 200 images, both
    python benchmarks/arm_check.py --models mobilevit_xxs.cifar10 --recipe minmax
"""

from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

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

MODELS = ("mobilevit_xxs.cifar10", "mobilevitv2_050.cifar10")
DOT = ("sdot", "udot", "usdot", "sudot", "smmla", "ummla", "usmmla")
MUL = ("madd", "msub", "mul", "smull", "smull2", "smlal", "smlal2", "umull", "umull2",
       "umlal", "umlal2", "smaddl", "umaddl", "mla")  # fmt: skip
INSTALLED_PLUGINS = (
    "/usr/lib/*/qemu/plugins/libinsn.so",
    "/usr/lib/qemu/plugins/libinsn.so",
    "/usr/local/lib/qemu/plugins/libinsn.so",
    "/usr/libexec/qemu/plugins/libinsn.so",
    "/usr/local/libexec/qemu/plugins/libinsn.so",
)

# A TCG plugin for qemu's plugin API v1 (the declarations it uses, so that no qemu header is
# needed): counts executed instructions, and those whose mnemonic is a dot product or a multiply,
# by inline additions per translated block; prints "insns: N", "dot: N", "mul: N" at exit.
PLUGIN_SOURCE = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
extern void qemu_plugin_register_vcpu_tb_trans_cb(
    qemu_plugin_id_t, void (*)(qemu_plugin_id_t, struct qemu_plugin_tb *));
extern size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *);
extern struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *, size_t);
extern char *qemu_plugin_insn_disas(const struct qemu_plugin_insn *);
extern const void *qemu_plugin_insn_data(const struct qemu_plugin_insn *);
extern size_t qemu_plugin_insn_size(const struct qemu_plugin_insn *);
extern void qemu_plugin_register_vcpu_tb_exec_inline(
    struct qemu_plugin_tb *, enum qemu_plugin_op, void *, uint64_t);
extern void qemu_plugin_register_atexit_cb(
    qemu_plugin_id_t, void (*)(qemu_plugin_id_t, void *), void *);
extern void qemu_plugin_outs(const char *);
__attribute__((visibility("default"))) int qemu_plugin_version = 1;
static uint64_t insns, dots, muls;
static const char *DOT[] = {@DOT@, 0};
static const char *MUL[] = {@MUL@, 0};
static int is_one_of(const char *disas, const char **names) {
    char op[16] = {0};
    sscanf(disas, "%15s", op);
    for (int i = 0; names[i]; i++)
        if (!strcmp(op, names[i])) return 1;
    return 0;
}
/* by encoding (qemu 7.2's disassembler prints these as .byte): SDOT/UDOT (vector, element),
   USDOT/SUDOT, SMMLA/UMMLA/USMMLA */
static int is_dot_word(uint32_t w) {
    return (w & 0x9fe0fc00) == 0x0e809400 || (w & 0x9fc0f400) == 0x0f80e000
        || (w & 0xbfe0fc00) == 0x0e809c00 || (w & 0xbf40f400) == 0x0f00f000
        || (w & 0xdfe0f400) == 0x4e80a400;
}
static void translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
    size_t n = qemu_plugin_tb_n_insns(tb), d = 0, m = 0;
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        char *text = qemu_plugin_insn_disas(insn);
        uint32_t word = 0;
        if (qemu_plugin_insn_size(insn) == 4) memcpy(&word, qemu_plugin_insn_data(insn), 4);
        d += is_dot_word(word) || (text && is_one_of(text, DOT));
        if (text) {
            m += is_one_of(text, MUL);
            free(text);
        }
    }
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insns, n);
    if (d) qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &dots, d);
    if (m) qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &muls, m);
}
static void done(qemu_plugin_id_t id, void *p) {
    char out[128];
    snprintf(out, sizeof out, "insns: %llu\ndot: %llu\nmul: %llu\n",
             (unsigned long long)insns, (unsigned long long)dots, (unsigned long long)muls);
    qemu_plugin_outs(out);
}
__attribute__((visibility("default")))
int qemu_plugin_install(qemu_plugin_id_t id, const void *info, int argc, char **argv) {
    qemu_plugin_register_vcpu_tb_trans_cb(id, translate);
    qemu_plugin_register_atexit_cb(id, done, NULL);
    return 0;
}
"""


def find_plugin(choice: str, work: Path) -> Path | None:
    """The instruction-counting qemu plugin: ``choice`` a path, ``none``, or ``auto`` (an
    installed ``libinsn.so``, else the counter above compiled into ``work``; None if no ``cc``)."""
    if choice == "none":
        return None
    if choice != "auto":
        return Path(choice)
    for pattern in INSTALLED_PLUGINS:
        if found := sorted(glob.glob(pattern)):
            return Path(found[0])
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    quoted = [", ".join(f'"{m}"' for m in names) for names in (DOT, MUL)]
    text = PLUGIN_SOURCE.replace("@DOT@", quoted[0]).replace("@MUL@", quoted[1])
    out = work / f"libcount_insns.{hashlib.sha1(text.encode()).hexdigest()[:8]}.so"
    if not out.exists():
        source = out.with_suffix(".c")
        source.write_text(text)
        subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(source)], check=True)
    return out


def executed(library: Path, image: torch.Tensor, plugin: Path, work: Path) -> dict[str, int]:
    """Instructions (and dot products / multiplies where the plugin counts them) of one
    inference on ``image``: a ``--repeat 2`` run minus a ``--repeat 1`` run, one thread."""
    from hyq_fx.backends import tvm_deploy

    runtime = tvm_deploy.aarch64_runtime()
    runner = tvm_deploy.build_runner(runtime)
    counts = []
    for repeat in (1, 2):
        log = work / f"{library.stem}.insns.r{repeat}.log"
        launcher = tvm_deploy.qemu_launcher(runtime, threads=1)
        launcher[1:1] = ["-plugin", str(plugin), "-d", "plugin", "-D", str(log)]
        tvm_deploy.run_runner(runner, library, image, launcher=launcher, repeat=repeat)
        counts.append({k: int(v) for k, v in re.findall(r"(\w+): (\d+)", log.read_text())})
    return {k: counts[1][k] - counts[0][k] for k in counts[1] if k in counts[0]}


def static_counts(library: Path) -> dict[str, Any]:
    """objdump counts: per conv2d / matmul kernel, and totals over all compute kernels."""
    from hyq_fx.backends.tvm_arm_dot import kernel_instructions

    listing = kernel_instructions(library)
    kernels, total = {}, Counter()
    for name, ops in listing.items():
        row = {
            "instructions": len(ops),
            "dot": sum(ops.count(m) for m in DOT),
            "mul": sum(ops.count(m) for m in MUL),
        }
        total.update(row)
        if "conv2d" in name or "matmul" in name:
            kernels[name.removesuffix("_compute_")] = row
    conv = Counter()
    for row in kernels.values():
        conv.update(row)
    return {
        "kernels_all": len(listing),
        "all": dict(total),
        "conv_matmul_kernels": len(kernels),
        "conv_matmul": dict(conv),
        "conv_matmul_with_dot": sum(row["dot"] > 0 for row in kernels.values()),
        "kernels": kernels,
    }


def build(qgm: Any, example: torch.Tensor, library: Path, **options: Any) -> dict[str, Any]:
    """``library`` built unless it and its ``.json`` are there; its ``.json``."""
    from hyq_fx.backends.tvm_relax import build_tvm

    meta = library.with_suffix(".json")
    if not (library.exists() and meta.exists()):
        start = time.perf_counter()
        build_tvm(qgm, example, "aarch64", library, **options)
        print(f"  built {library.name} in {time.perf_counter() - start:.0f} s", flush=True)
    return json.loads(meta.read_text())


def check(name: str, args: argparse.Namespace, plugin: Path | None) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from hyq_fx.backends import tvm_deploy
    from hyq_fx.data import image_folder
    from hyq_fx.quantize import quantizers_mode

    start = time.perf_counter()
    work = args.work
    _, info, _, qgm = load_quantized(name, args.recipe, args.calib_size, work)
    qgm.eval()
    data = image_folder(SHARED / "data" / "cifar10" / "dev", info, limit=args.limit)
    stem = work / f"{name}.{args.recipe}"
    first = next(iter(DataLoader(data, batch_size=1)))[0]
    libs = {"int8": Path(f"{stem}.int8.aarch64.so"), "fp32": Path(f"{stem}.fp32.aarch64.so")}
    metas = {k: build(qgm, first, p, integer=k == "int8") for k, p in libs.items()}
    # the int8 library under qemu, batch by batch, each batch's logits kept for a rerun
    lib_logits, fq_logits, labels = [], [], []
    run_s = 0.0
    for i, (x, y) in enumerate(DataLoader(data, batch_size=args.batch)):
        cached = work / f"{libs['int8'].stem}.n{args.limit}.b{args.batch}.{i}.pt"
        if cached.exists():
            out = torch.load(cached)
        else:
            t = time.perf_counter()
            out = tvm_deploy.run_aarch64(libs["int8"], x)
            run_s += time.perf_counter() - t
            torch.save(out, cached)
            done = i * args.batch + len(y)
            print(f"  {name}: {done}/{len(data)} images under qemu", flush=True)
        with torch.no_grad():
            fq_logits.append(qgm(x))
        lib_logits.append(out)
        labels.append(y)
    got, want, labels_ = torch.cat(lib_logits), torch.cat(fq_logits), torch.cat(labels)
    # the FP32 library on one image, against the float model (quantizers off)
    fp32_one = tvm_deploy.run_aarch64(libs["fp32"], first)
    with torch.no_grad(), quantizers_mode(qgm, "off"):
        float_one = qgm(first)
    cost = {k: {"static": static_counts(p)} for k, p in libs.items()}
    if plugin is not None:
        for k, p in libs.items():
            cost[k]["executed_batch1"] = executed(p, first, plugin, work)
    return {
        "model": name,
        "recipe": args.recipe,
        "images": len(labels_),
        "batch": args.batch,
        "agreement_pct": round(100 * (got.argmax(1) == want.argmax(1)).float().mean().item(), 2),
        "max_abs_diff": (got - want).abs().max().item(),
        "top1_library": round(100 * (got.argmax(1) == labels_).float().mean().item(), 2),
        "top1_fake_quant": round(100 * (want.argmax(1) == labels_).float().mean().item(), 2),
        "fp32_library_max_abs_diff_1img": (fp32_one - float_one).abs().max().item(),
        "build_s": {
            k: round(m.get("build_seconds", m.get("build_s", 0.0)), 1) for k, m in metas.items()
        },  # fmt: skip
        "arm_dot": metas["int8"].get("arm_dot"),
        "library_bytes": {k: p.stat().st_size for k, p in libs.items()},
        "qemu_run_s": round(run_s, 1),
        "total_s": round(time.perf_counter() - start, 1),
        "cost": cost,
        "plugin": str(plugin) if plugin else None,
        "command": command_line(),
    }


def summary(row: dict[str, Any]) -> str:
    s = row["cost"]
    line = (
        f"{row['model']} ({row['recipe']}): {row['images']} images, agreement "
        f"{row['agreement_pct']} %, max |Δ| {row['max_abs_diff']:.2e}, top-1 library "
        f"{row['top1_library']} / fake-quant {row['top1_fake_quant']}; static instructions "
        f"int8 {s['int8']['static']['all']['instructions']} vs FP32 "
        f"{s['fp32']['static']['all']['instructions']}"
    )
    if "executed_batch1" in s["int8"]:
        line += (
            f"; executed (batch 1) int8 {s['int8']['executed_batch1']['insns']:,} vs FP32 "
            f"{s['fp32']['executed_batch1']['insns']:,}"
        )
    return line


def count(row: dict[str, int], key: str) -> str:
    return f"{row[key]:,}" if key in row else "—"


def pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "—"


def markdown(data: dict[str, Any]) -> str:
    lines = markdown_header("Shared checkpoints as aarch64 libraries under qemu", data)
    lines += [
        f"Date: {data.get('date', '')}",
        "",
        "The W8A8 library (int8 conv2d / matmul with `sdot`, target `llvm -mtriple="
        "aarch64-linux-gnu -mattr=+neon,+dotprod`) is run by the C++ Relax VM runner under "
        "`qemu-aarch64` on this x86 host and compared with the fake-quant model on a "
        "class-balanced subset of `limit` dev images (`image_folder(..., limit=...)`, seed 0). "
        "**The instruction counts are a cost proxy, not a timing**: static counts are lines of "
        "`objdump -d` per compute kernel (loops counted once); executed counts (where a qemu "
        "instruction-counting plugin ran) are the instructions qemu executed for one batch-1 "
        "inference, one thread (a `--repeat 2` run minus a `--repeat 1` run). Neither says how "
        "fast an ARM CPU runs the library. Multiplies are counted by mnemonic (scalar and "
        "vector `mul`/`mla`/`smull`/`smlal`/`madd`...), dot products are `sdot`/`udot`/`usdot`/"
        "`smmla` (executed: by encoding); float multiplies (`fmul`/`fmla`) are not counted.",
        "",
    ]
    for row in sorted(data["rows"].values(), key=lambda r: (-r["images"], r["model"])):
        s = {k: row["cost"][k]["static"] for k in ("int8", "fp32")}
        lines += [
            f"## {row['model']} ({row['recipe']} W8A8, {row['images']} images)",
            "",
            f"Command: `{row.get('command', data.get('command', ''))}`",
            "",
            "| images | batch | top-1 agreement | max abs Δ logit | top-1 library "
            "| top-1 fake-quant | FP32 library vs float model (1 image) | qemu run s |",
            "|---|---|---|---|---|---|---|---|",
            f"| {row['images']} | {row['batch']} | {row['agreement_pct']} % "
            f"| {row['max_abs_diff']:.2e} | {row['top1_library']} | {row['top1_fake_quant']} "
            f"| {row['fp32_library_max_abs_diff_1img']:.2e} | {row['qemu_run_s']} |",
            "",
            "| library | bytes | build s | kernels | static instr. (all) | conv/matmul kernels "
            "| with dot | static instr. conv/matmul | dot share | mul share "
            "| executed instr. (batch 1) | executed dot | executed mul |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for k in ("int8", "fp32"):
            c, e = s[k]["conv_matmul"], row["cost"][k].get("executed_batch1", {})
            lines.append(
                f"| {k} | {row['library_bytes'][k]:,} | {row['build_s'][k]} "
                f"| {s[k]['kernels_all']} | {s[k]['all']['instructions']:,} "
                f"| {s[k]['conv_matmul_kernels']} | {s[k]['conv_matmul_with_dot']} "
                f"| {c.get('instructions', 0):,} "
                f"| {pct(c.get('dot', 0), c.get('instructions', 0))} "
                f"| {pct(c.get('mul', 0), c.get('instructions', 0))} "
                f"| {count(e, 'insns')} | {count(e, 'dot')} | {count(e, 'mul')} |"
            )
        lines += [
            "",
            "<details><summary>int8 conv2d / matmul kernels (static objdump counts)</summary>",
            "",
            "| kernel | instructions | dot | dot share | mul | mul share |",
            "|---|---|---|---|---|---|",
        ]
        for kernel, r in s["int8"]["kernels"].items():
            lines.append(
                f"| `{kernel}` | {r['instructions']} | {r['dot']} "
                f"| {pct(r['dot'], r['instructions'])} | {r['mul']} "
                f"| {pct(r['mul'], r['instructions'])} |"
            )
        lines += ["", "</details>", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--recipe", default="hyq-fx", help="W8A8 recipe (default hyq-fx)")
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--limit", type=int, default=200, help="dev images to run under qemu")
    p.add_argument("--batch", type=int, default=25, help="images per qemu run")
    p.add_argument("--plugin", default="auto", help="qemu plugin path, 'auto' or 'none'")
    p.add_argument("--work", type=Path, default=Path("/tmp/arm_check"), help="cache directory")
    p.add_argument("--out", default=str(RESULTS / "arm_check"), help="results path stem")
    p.add_argument("--redo", action="store_true", help="recompute finished rows")
    args = p.parse_args()
    from hyq_fx.backends import tvm_deploy

    if missing := tvm_deploy.aarch64_tools_missing():
        p.error(f"missing {', '.join(missing)}: run scripts/install_arm_tools.sh")
    args.work.mkdir(parents=True, exist_ok=True)
    plugin = find_plugin(args.plugin, args.work)
    out = Path(args.out)
    store = ResultStore(out.with_suffix(".json"))
    store.data.update(
        machine=machine(),
        command=command_line(),
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
    for name in args.models:
        key = f"{name}:{args.recipe}:{args.limit}"
        if store.has(key) and not args.redo:
            print(summary(store.get(key)))
            continue
        print(f"{name}: {args.recipe} W8A8, {args.limit} images", flush=True)
        store.put(key, check(name, args, plugin))
        print(summary(store.get(key)), flush=True)
    store.save()
    out.with_suffix(".md").write_text(markdown(store.data))


if __name__ == "__main__":
    main()
