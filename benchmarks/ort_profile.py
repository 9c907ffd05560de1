"""Where onnxruntime spends its time: per-op-type kernel time of ONNX models, side by side.

Runs each ``.onnx`` with onnxruntime's profiler (``SessionOptions.enable_profiling``) on a
random batch and sums the kernel time of every node by op type (after ORT's graph
optimisations, so fused ops such as ``QLinearConv`` or ``QuickGelu`` appear as such). Meant
for the files ``benchmarks/latency.py`` caches in its ``--work`` folder, e.g. to see why the
int8 QDQ model is slower than FP32 at batch 32. Writes ``benchmarks/results/ort_profile.{json,md}``.

    python benchmarks/ort_profile.py /tmp/hyq-latency/mobilevit_xxs.cifar10.fp32.onnx \\
        /tmp/hyq-latency/mobilevit_xxs.cifar10.qdq_auto.onnx --batch 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, command_line, machine, markdown_header  # noqa: E402


def profile(path: Path, batch: int, runs: int, threads: int) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.intra_op_num_threads = threads
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / path.stem)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    shape = [batch if not isinstance(d, int) or i == 0 else d for i, d in enumerate(inp.shape)]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    session.run(None, {inp.name: x})  # warm-up (also profiled: subtracted below)
    start = time.perf_counter()
    for _ in range(runs):
        session.run(None, {inp.name: x})
    wall_ms = (time.perf_counter() - start) / runs * 1000
    events = json.loads(Path(session.end_profiling()).read_text())
    total, count = Counter(), Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            total[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    calls = runs + 1
    return {
        "file": str(path),
        "batch": batch,
        "wall_ms": round(wall_ms, 2),
        "ops": {
            op: {"ms": round(us / calls / 1000, 2), "nodes": count[op] // calls}
            for op, us in total.most_common()
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("models", nargs="+", type=Path, help=".onnx files")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--out", default=str(RESULTS / "ort_profile"), help="results path stem")
    args = p.parse_args()
    results = [profile(m, args.batch, args.runs, args.threads) for m in args.models]
    data = {"machine": machine(), "command": command_line(), "threads": args.threads,
            "profiles": results}  # fmt: skip
    Path(args.out + ".json").write_text(json.dumps(data, indent=2))
    ops = list(dict.fromkeys(op for r in results for op in r["ops"]))
    ops.sort(key=lambda op: -max(r["ops"].get(op, {"ms": 0})["ms"] for r in results))
    names = [Path(r["file"]).stem for r in results]
    lines = [
        *markdown_header(
            f"onnxruntime kernel time by op type, batch {args.batch}, {args.threads} threads", data
        ),
        "ms per run (nodes); wall = mean of the timed runs, profiling on.",
        "",
        "| op type | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        "| **wall** | " + " | ".join(f"**{r['wall_ms']:.1f}**" for r in results) + " |",
    ]
    for op in ops:
        cells = [
            f"{r['ops'][op]['ms']:.1f} ({r['ops'][op]['nodes']})" if op in r["ops"] else "—"
            for r in results
        ]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
