"""Two or three runtimes timed against each other, alone in one process, plus TVM's per-kernel time.

``latency.py`` interleaves seven runtimes in one process. On the 2-core VM, its torch-eager
figure read 90-138 ms there against 12-20 ms alone, so the neighbours' thread pools disturb
one another. This script loads only the files it is given: ``.onnx`` (onnxruntime, CPU,
``--threads`` intra-op threads) or ``.so`` (a hyq-fx TVM Relax library, static or dynamic
batch). It times them in alternating blocks of ``--block`` runs for ``--rounds`` rounds, so
slow phases of the VM hit every file alike, and reports the median and 10th percentile of
each. With ``--kernels N`` it also lists the N costliest kernels of each TVM library (Relax VM
instrument: wall time of each call, summed per kernel name, over ``--block`` runs).

Runtimes that share a process also share the two cores with each other's idle thread pools:
TVM's workers spin after a run (ONNX Runtime FP32 read 7.4 ms beside a fully tuned TVM
library, 2.2 ms alone) and without the spin (``TVM_THREAD_POOL_SPIN_COUNT=0``) TVM itself took
7.5 ms instead of 2.9. ``--separate R`` therefore times each file in a process of its own,
R processes per file in turn, which is the fair comparison on a small machine.

    python benchmarks/latency_pair.py /tmp/lat/mobilevit_xxs.cifar10.fp32.onnx \\
        /tmp/lat/mobilevit_xxs.cifar10.hyq-fx.tvm_int8_tuned_b1.so --kernels 15 \\
        --out benchmarks/results/latency_pair
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, command_line, machine  # noqa: E402


def _ort(path: Path, x: np.ndarray, threads: int) -> Callable[[], object]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    return lambda: session.run(None, feed)


def _tvm_vm(path: Path):
    import tvm
    from tvm import relax

    return relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())


def _tvm(path: Path, x: np.ndarray) -> Callable[[], object]:
    import tvm

    vm, arg = _tvm_vm(path), tvm.runtime.tensor(x)
    return lambda: vm["main"](arg)


def tvm_kernels(path: Path, x: np.ndarray, runs: int, top: int) -> list[dict]:
    """The ``top`` kernels by summed wall time per run (the instrument adds a little to each)."""
    import tvm

    vm, arg = _tvm_vm(path), tvm.runtime.tensor(x)
    spent: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    started = [0.0]

    def instrument(_func, name, before, _ret, *_args):
        if before:
            started[0] = time.perf_counter()
        else:
            spent[name] += time.perf_counter() - started[0]
            calls[name] += 1
        return 0

    vm["main"](arg)
    vm.set_instrument(instrument)
    for _ in range(runs):
        vm["main"](arg)
    total = sum(spent.values())
    rows = sorted(spent, key=spent.__getitem__, reverse=True)
    every = {"kernel": "(all)", "ms": round(total / runs * 1e3, 3)}
    return [{**every, "calls": sum(calls.values()) // runs}] + [
        {"kernel": k, "ms": round(spent[k] / runs * 1e3, 3), "calls": calls[k] // runs}
        for k in rows[:top]
    ]


def measure(files: list[Path], x: np.ndarray, args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds per run of each file, in alternating blocks (after one warm-up block each)."""
    runners = {
        str(f): _ort(f, x, args.threads) if f.suffix == ".onnx" else _tvm(f, x) for f in files
    }
    times: dict[str, list[float]] = {k: [] for k in runners}
    for fn in runners.values():  # warm-up
        for _ in range(args.block):
            fn()
    for _ in range(args.rounds):
        for key, fn in runners.items():
            for _ in range(args.block):
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("files", nargs="+", type=Path, help=".onnx (onnxruntime) or .so (TVM) files")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, nargs=3, default=[3, 128, 128], metavar=("C", "H", "W"))
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--block", type=int, default=5, help="runs of one file before the next")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--kernels", type=int, default=0, help="list the N costliest TVM kernels")
    p.add_argument(
        "--separate",
        type=int,
        default=0,
        metavar="R",
        help="time each file in its own process, R times in turn (thread pools of runtimes "
        "sharing a process slow one another down)",
    )
    p.add_argument("--times-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(RESULTS / "latency_pair"), help="results path stem")
    args = p.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    bad = [f for f in args.files if f.suffix not in (".onnx", ".so") or not f.is_file()]
    if bad:
        p.error(f"{bad[0]}: give existing .onnx (onnxruntime) or .so (TVM library) files")
    x = np.random.default_rng(0).random((args.batch, *args.size), dtype=np.float32)
    if args.times_only:  # a child of --separate: one file, its times on stdout
        print(json.dumps(measure(args.files, x, args)))
        return
    if args.separate:
        times: dict[str, list[float]] = {str(f): [] for f in args.files}
        child = [sys.executable, __file__, "--times-only", "--batch", str(args.batch),
                 "--size", *map(str, args.size), "--block", str(args.block),
                 "--threads", str(args.threads),
                 "--rounds", str(max(1, args.rounds // args.separate))]  # fmt: skip
        for _ in range(args.separate):
            for f in args.files:
                out = subprocess.run([*child, str(f)], capture_output=True, text=True, check=True)
                times[str(f)] += json.loads(out.stdout.strip().splitlines()[-1])[str(f)]
    else:
        times = measure(args.files, x, args)
    rows = [
        {
            "file": k,
            "median_ms": round(float(np.median(v)) * 1e3, 2),
            "p10_ms": round(float(np.percentile(v, 10)) * 1e3, 2),
            "p90_ms": round(float(np.percentile(v, 90)) * 1e3, 2),
            "runs": len(v),
        }
        for k, v in times.items()
    ]
    kernels = {
        str(f): tvm_kernels(f, x, args.block, args.kernels)
        for f in args.files
        if args.kernels and f.suffix == ".so"
    }
    result = {
        "machine": {**machine(), "threads": args.threads},
        "command": command_line(),
        "batch": args.batch,
        "separate_processes": args.separate,
        "rows": rows,
        "kernels": kernels,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Latency of runtimes timed alone against each other (alternating blocks)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {', '.join(f'{k} {v}' for k, v in result['machine'].items())}",
        "",
        f"Batch {args.batch}, {args.rounds} rounds x {args.block} runs per file; ms; "
        + (
            f"each file in its own process, {args.separate} processes per file in turn."
            if args.separate
            else "all files in one process."
        ),
        "",
        "| file | median | p10 | p90 | vs first (median) |",
        "|---|---|---|---|---|",
    ]
    first = rows[0]["median_ms"]
    for r in rows:
        ratio = first / r["median_ms"]
        lines.append(
            f"| `{Path(r['file']).name}` | {r['median_ms']} | {r['p10_ms']} | {r['p90_ms']} | "
            f"{ratio:.2f}x |"
        )
    for f, ks in kernels.items():
        lines += ["", f"TVM kernels of `{Path(f).name}` (ms per run, calls per run):", ""]
        lines += ["| kernel | ms | calls |", "|---|---|---|"]
        lines += [f"| `{k['kernel']}` | {k['ms']} | {k['calls']} |" for k in ks]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
