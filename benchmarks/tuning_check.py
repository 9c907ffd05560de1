"""A real MetaSchedule search on a tiny model: the tuning check that pytest leaves out.

``tests/test_tvm_backend.py`` and ``tests/test_tvm_vnni.py`` replace MetaSchedule's search by
untimed records, so that pytest stays fast and deterministic. This script runs the search: it
quantizes a tiny conv → SiLU → linear model (``minmax``, W8A8), builds it for this CPU with
``build_tvm(..., dynamic_batch=False, tune_trials=--trials)`` into a fresh directory, then
rebuilds it from the database that tuning wrote (``tune_trials=0``). For both builds it reports
the tasks, records, kernels scheduled from the database, tuning seconds and the largest logit
difference to the fake-quant model, and checks what ``backends/tvm_tuning.py`` promises:

* the tuning writes at least one record and schedules at least one kernel from it;
* the rebuild (no search) schedules the same kernels from the same records;
* both libraries match the fake-quant model (max |Δ logit| ≤ 1e-4).

On a CPU with AVX-512 VNNI the int8 kernels are VNNI kernels; ``--no-vnni`` tunes TVM's own
kernels. Either way MetaSchedule's ``TuneContext`` imports TVM's whole tensor-intrinsic table
first (27-69 s on 2 cores).
Writes ``benchmarks/results/tuning_check.{json,md}`` (``--out``) and exits 1 if a check fails.

    python benchmarks/tuning_check.py --trials 8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, command_line, machine, markdown_header  # noqa: E402

import hyq_fx  # noqa: E402
from hyq_fx.backends.tvm_relax import TvmRunner, build_tvm  # noqa: E402

TOLERANCE = 1e-4  # max |Δ logit| between a library and the fake-quant model


def tiny_model() -> nn.Module:
    """conv 3→16 (3x3) → SiLU → linear 1024→10 on 3×8×8 images: one conv and one matmul task."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10)
    ).eval()


def build_and_compare(
    gm: torch.fx.GraphModule, images: torch.Tensor, library: Path, **build_args: Any
) -> dict[str, Any]:
    """Build ``gm`` at batch 1 into ``library``; its tuning summary and logit difference."""
    start = time.perf_counter()
    build_tvm(gm, images[:1], "llvm", library, dynamic_batch=False, **build_args)
    seconds = time.perf_counter() - start
    meta = json.loads(library.with_suffix(".json").read_text())
    with torch.no_grad():
        diff = (TvmRunner(library)(images) - gm(images)).abs().max().item()
    return {
        **meta["tuning"],
        "vnni": meta["vnni"],
        "build_seconds": round(seconds, 1),
        "max_abs_diff": diff,
    }


def failed_checks(tuned: dict[str, Any], rebuilt: dict[str, Any]) -> list[str]:
    """The promises of ``tvm_tuning`` that this run broke (none: all held)."""
    failures = []
    if tuned["records"] < 1 or tuned["kernels_from_database"] < 1:
        failures.append("the tuning scheduled no kernel from a record")
    if any(rebuilt[key] != tuned[key] for key in ("records", "kernels_from_database")):
        failures.append("the rebuild did not apply the same records to the same kernels")
    for name, row in (("tuned", tuned), ("rebuilt", rebuilt)):
        if not row["max_abs_diff"] <= TOLERANCE:
            failures.append(f"the {name} library differs from the fake-quant model")
    return failures


def markdown(result: dict[str, Any]) -> str:
    lines = markdown_header("MetaSchedule tuning check (a real search on a tiny model)", result)
    lines += [
        f"{result['model']}; {result['trials']} trials; database `{result['database']}`.",
        "",
        "| build | trials | tasks | records | kernels from database | tune s | build s "
        "| max abs diff vs fake-quant |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("tuned", "rebuilt"):
        row = result[name]
        lines.append(
            f"| {name} | {row['trials']} | {row.get('tasks', '—')} | {row['records']} "
            f"| {row['kernels_from_database']} of {row['kernels']} "
            f"| {row.get('tune_seconds', '—')} | {row['build_seconds']} "
            f"| {row['max_abs_diff']:.2e} |"
        )
    vnni = result["tuned"]["vnni"] or {}
    kernels = ", ".join(f"{op} {n}" for op, n in vnni.items()) or "none"
    verdict = "; ".join(result["failures"]) or "all checks passed"
    lines += ["", f"VNNI kernels: {kernels}. Result: {verdict}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trials", type=int, default=8, help="MetaSchedule's global trial budget")
    p.add_argument("--no-vnni", action="store_true", help="tune TVM's kernels, not VNNI ones")
    p.add_argument("--work", type=Path, help="a new directory for the libraries (default: temp)")
    p.add_argument("--out", default=str(RESULTS / "tuning_check"), help="results path stem")
    args = p.parse_args()
    if args.trials < 1:
        p.error("--trials must be at least 1: the check is about a real search")
    work = args.work or Path(tempfile.mkdtemp(prefix="tuning_check."))
    library = work / "tiny.llvm.so"
    if library.with_suffix(".tuning").exists():
        p.error(f"{library.with_suffix('.tuning')} already holds a database; give a new --work")
    calib = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    gm = hyq_fx.quantize(tiny_model(), calib, "minmax", 8, 8, progress=False)
    images = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    vnni = not args.no_vnni
    tuned = build_and_compare(gm, images, library, tune_trials=args.trials, vnni=vnni)
    rebuilt = build_and_compare(gm, images, library, tune_trials=0, vnni=vnni)
    result = {
        "machine": machine(),
        "command": command_line(),
        "model": "conv 3→16 (3x3) → SiLU → linear 1024→10, minmax W8A8, batch 1, 3×8×8",
        "trials": args.trials,
        "database": str(library.with_suffix(".tuning")),
        "tuned": tuned,
        "rebuilt": rebuilt,
        "failures": failed_checks(tuned, rebuilt),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    sys.exit(1 if result["failures"] else 0)


if __name__ == "__main__":
    main()
