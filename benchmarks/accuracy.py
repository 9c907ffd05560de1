"""Accuracy benchmark: every recipe × bit setting × shared CIFAR-10 checkpoint, in one run.

Calibrates on ``../shared/data/cifar10/calib`` and evaluates FP32 and quantized top-1 on
``../shared/data/cifar10/dev``. Writes ``benchmarks/results/accuracy.{json,md}``; each
(model, recipe, setting) row is saved as soon as it is done, so a rerun resumes.

    python benchmarks/accuracy.py                        # everything
    python benchmarks/accuracy.py --models mobilevit_xxs.cifar10 --recipes minmax \\
        --settings W8A8 W6A6 --limit 1000                # a subset
    python benchmarks/accuracy.py --jobs 16 --eval-device cuda   # a 16-core machine with a GPU

``--jobs N`` runs the (model, recipe, setting) rows in N single-threaded worker processes
(rows merge into the one results file); ``--eval-device cuda`` calibrates on the CPU as always
and evaluates the quantized model on the GPU, with TF32 off so that the float arithmetic is
IEEE FP32 as on the CPU (a row falls back to CPU evaluation if its graph fails on the GPU).
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import (  # noqa: E402
    RESULTS,
    SETTINGS,
    SHARED,
    ResultStore,
    command_line,
    machine,
    markdown_header,
)

import hyq_fx  # noqa: E402
from hyq_fx.data import evaluate_top1, image_folder, make_loader  # noqa: E402
from hyq_fx.models import load_model  # noqa: E402

MODELS = ("mobilevit_xxs.cifar10", "mobilevitv2_050.cifar10")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--recipes", nargs="+", default=sorted(hyq_fx.RECIPES))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--limit", type=int, help="evaluate on a class-balanced subset of dev")
    p.add_argument("--out", default=str(RESULTS / "accuracy"), help="results path stem")
    p.add_argument("--fresh", action="store_true", help="ignore rows saved by an earlier run")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (one thread each)")
    p.add_argument("--eval-device", default="cpu", help="cpu, or cuda to evaluate on a GPU")
    p.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json")
    args = p.parse_args()
    if args.report_only:
        write_markdown(ResultStore(Path(args.out + ".json")), Path(args.out + ".md"))
        return
    if args.jobs > 1:  # the workers take the cores; many threads here only contend with them
        torch.set_num_threads(1)
    if args.eval_device.startswith("cuda"):
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    if args.fresh:  # rows are merged with the file on every save: start from no file
        Path(args.out + ".json").unlink(missing_ok=True)
    store = ResultStore(Path(args.out + ".json"))
    store.data["machine"] = machine()
    store.data["command"] = command_line()
    calib_dir = SHARED / "data" / "cifar10" / "calib"
    dev_dir = SHARED / "data" / "cifar10" / "dev"
    for name in args.models:
        model, info = load_model(f"local-dir:{SHARED / 'checkpoints' / name}")
        dev = make_loader(image_folder(dev_dir, info, limit=args.limit), batch_size=100)
        calib = make_loader(image_folder(calib_dir, info, limit=args.calib_size), batch_size=32)
        fp_key = f"{name}|fp32|{args.limit}"
        if not store.has(fp_key):
            fp, _ = evaluate(copy.deepcopy(model), dev, args.eval_device, f"{name} fp32")
            store.put(fp_key, {"model": name, "top1": fp["top1"] * 100, "n_eval": fp["n"]})
        fp_top1 = store.get(fp_key)["top1"]
        if args.jobs > 1:
            continue
        for recipe in args.recipes:
            for setting in args.settings:
                key = f"{name}|{recipe}|{setting}|{args.calib_size}|{args.limit}"
                if store.has(key):
                    continue
                w_bits, a_bits = SETTINGS[setting]
                start = time.perf_counter()
                qgm = hyq_fx.quantize(model, calib, recipe, w_bits, a_bits, seed=0)
                calib_s = time.perf_counter() - start
                q, eval_device = evaluate(qgm, dev, args.eval_device, f"{name} {recipe} {setting}")
                store.put(
                    key,
                    {
                        "model": name,
                        "recipe": recipe,
                        "setting": setting,
                        "fp32_top1": round(fp_top1, 2),
                        "quant_top1": round(q["top1"] * 100, 2),
                        "drop": round(fp_top1 - q["top1"] * 100, 2),
                        "calib_seconds": round(calib_s, 1),
                        "n_calib": args.calib_size,
                        "n_eval": q["n"],
                        "eval_device": eval_device,
                        "torch": torch.__version__,
                    },
                )
                print(store.get(key), flush=True)
    if args.jobs > 1:
        run_workers(args, store)
    write_markdown(store, Path(args.out + ".md"))


def evaluate(qgm, dev, device: str, desc: str) -> tuple[dict, str]:
    """Top-1 of ``qgm`` on ``device``; on the CPU if the graph cannot run there."""
    if device != "cpu":
        try:
            return evaluate_top1(qgm.to(device), dev, desc=desc), device
        except (RuntimeError, NotImplementedError) as err:
            print(f"{desc}: evaluation on {device} failed ({err}); evaluating on the CPU")
    return evaluate_top1(qgm.cpu(), dev, desc=desc), "cpu"


def run_workers(args: argparse.Namespace, store: ResultStore) -> None:
    """One single-threaded process per missing (model, recipe, setting) row, ``--jobs`` at once."""
    # the longest recipes (most passes) first, so that the last workers finish together
    order = sorted(args.recipes, key=lambda r: -len(hyq_fx.get_recipe(r).passes))
    tasks = [
        (name, recipe, setting)
        for recipe in order
        for name in args.models
        for setting in args.settings
        if not store.has(f"{name}|{recipe}|{setting}|{args.calib_size}|{args.limit}")
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    logs = Path(args.out + "_logs")
    logs.mkdir(parents=True, exist_ok=True)

    def work(task: tuple[str, str, str]) -> int:
        name, recipe, setting = task
        cmd = [sys.executable, __file__, "--models", name, "--recipes", recipe, "--settings",
               setting, "--calib-size", str(args.calib_size), "--out", args.out,
               "--eval-device", args.eval_device]  # fmt: skip
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        with open(logs / f"{name}.{Path(recipe).stem}.{setting}.log", "w") as log:
            code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        print(f"{name} {recipe} {setting}: " + ("done" if code == 0 else f"FAILED ({code})"))
        return code

    with ThreadPoolExecutor(args.jobs) as pool:
        failed = sum(code != 0 for code in pool.map(work, tasks))
    store.data["rows"] = ResultStore(store.path).data["rows"]  # what the workers saved
    store.save()  # with this process's command line and machine, not a worker's
    if failed:
        print(f"{failed} of {len(tasks)} rows failed; their logs are in {logs}")


def write_markdown(store: ResultStore, path: Path) -> None:
    rows = [r for r in store.data["rows"].values() if "recipe" in r]
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    lines = [
        *markdown_header("Accuracy: top-1 on CIFAR-10 dev (drop vs FP32 in points)", store.data),
    ]
    fps = [r for r in store.data["rows"].values() if "recipe" not in r]
    for r in fps:
        lines.append(f"- FP32 {r['model']}: {r['top1']:.2f}% on {r['n_eval']} images")
    lines += ["", "| model | recipe | " + " | ".join(settings) + " | calib s |"]
    lines.append("|---|---|" + "---|" * len(settings) + "---|")
    for model in sorted({r["model"] for r in rows}):
        for recipe in sorted({r["recipe"] for r in rows if r["model"] == model}):
            cells, secs = [], []
            for s in settings:
                r = next(
                    (
                        x
                        for x in rows
                        if (x["model"], x["recipe"], x["setting"]) == (model, recipe, s)
                    ),
                    None,
                )
                cells.append(f"{r['quant_top1']:.2f} ({-r['drop']:+.2f})" if r else "—")
                if r:
                    secs.append(r["calib_seconds"])
            lines.append(
                f"| {model} | {recipe} | " + " | ".join(cells) + f" | {max(secs, default=0):.0f} |"
            )
        lines.append("")
    lines += ["Recipes (from the registry; `hyq_fx.recipes`):", ""]
    for recipe in sorted({r["recipe"] for r in rows}):
        try:
            lines.append(f"- `{recipe}`: {hyq_fx.get_recipe(recipe).description}")
        except Exception:  # a recipe file that is gone: its rows stay, without a description
            lines.append(f"- `{recipe}`")
    lines.append("")
    subsets = {(r["n_eval"], r["n_calib"]) for r in rows}
    lines.append(
        "Evaluated / calibrated on: "
        + ", ".join(f"{e} eval images, {c} calibration images" for e, c in sorted(subsets))
        + " (dev has 5000; fewer means a class-balanced subset)."
    )
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
