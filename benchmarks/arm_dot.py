"""aarch64 int8 kernels with and without Armv8.2 ``sdot`` (``backends/tvm_arm_dot.py``).

Quantizes a small conv + MLP model (``minmax``, W8A8), builds it for ``aarch64``
(``+neon,+dotprod``) twice, ``build_tvm(..., arm_dot=False)`` (TVM's default loop nests,
vectorized by LLVM) and ``arm_dot=True`` (packed weights, the 4 × 4 block tensorized with
``sdot``), and reports for each library:

* per conv2d / matmul kernel, from ``aarch64-linux-gnu-objdump -d``: its instructions (a static
  count: the lines of its compute function, not the instructions executed), its ``sdot`` and
  its widening multiply-adds (``smull``/``smlal``, with ``2`` variants) and its scalar
  ``madd`` (a scalar int8 loop's multiply-add, but also address arithmetic);
* the run time of the C++ runner under ``qemu-aarch64`` on this host (emulation: it measures
  how fast qemu translates and runs the code, not an ARM CPU; use it to compare the two
  libraries, not as phone time), and the largest logit difference to the fake-quant model.

Writes ``benchmarks/results/arm_dot.{json,md}`` (``--out``).

    python benchmarks/arm_dot.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, command_line, machine, markdown_header  # noqa: E402

import hyq_fx  # noqa: E402
from hyq_fx.backends import tvm_deploy  # noqa: E402
from hyq_fx.backends.tvm_arm_dot import kernel_instructions  # noqa: E402
from hyq_fx.backends.tvm_relax import build_tvm  # noqa: E402

WIDENING = ("smull", "smull2", "smlal", "smlal2")
INPUT_SHAPE = (3, 32, 32)


class SmallNet(nn.Module):
    """conv 3→32 (3x3, s2) → conv 32→64 (3x3, s2) → tokens → MLP 64→128→64 → linear 64→10."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
        )  # fmt: skip
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)
        t = t + self.mlp(t)
        return self.head(t.mean(1))


def measure(gm: Any, images: torch.Tensor, library: Path, repeat: int, **build: Any) -> dict:
    """Build ``library``; its conv / matmul kernels' instruction counts and its qemu run."""
    build_tvm(gm, images[:1], "aarch64", library, **build)
    meta = json.loads(library.with_suffix(".json").read_text())
    kernels = {}
    for name, ops in kernel_instructions(library).items():
        if "conv2d" in name or "matmul" in name:
            kernels[name.removesuffix("_compute_")] = {
                "instructions": len(ops),
                "sdot": ops.count("sdot"),
                "widening_mul": sum(ops.count(m) for m in WIDENING),
                "madd": ops.count("madd"),
            }
    run = tvm_deploy.run_aarch64_timed(library, images, repeat=repeat)
    with torch.no_grad():
        expected = gm(images)
    return {
        "arm_dot": meta["arm_dot"],
        "kernels": kernels,
        "instructions": sum(k["instructions"] for k in kernels.values()),
        "sdot": sum(k["sdot"] for k in kernels.values()),
        "widening_mul": sum(k["widening_mul"] for k in kernels.values()),
        "madd": sum(k["madd"] for k in kernels.values()),
        "library_bytes": library.stat().st_size,
        "qemu_first_ms": round(run.first_ms, 2),
        "qemu_mean_ms": round(run.mean_ms, 2),
        "max_abs_diff": (run.logits - expected).abs().max().item(),
        "same_top1": bool(torch.equal(run.logits.argmax(1), expected.argmax(1))),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = markdown_header("aarch64 int8 kernels: LLVM's vectorization vs sdot", result)
    lines += [
        f"{result['model']}; batch {result['batch']}, qemu mean of {result['repeat']} runs "
        "(emulated on this x86 host: a comparison of the two libraries, not ARM CPU time).",
        "",
        "| build | conv/matmul kernels | instructions (static) | sdot | smull/smlal | madd "
        "| qemu first ms | qemu mean ms | max abs diff vs fake-quant | same top-1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("before", "after"):
        row = result[name]
        lines.append(
            f"| {name} | {len(row['kernels'])} | {row['instructions']} | {row['sdot']} "
            f"| {row['widening_mul']} | {row['madd']} | {row['qemu_first_ms']} "
            f"| {row['qemu_mean_ms']} "
            f"| {row['max_abs_diff']:.2e} | {row['same_top1']} |"
        )
    for name in ("before", "after"):
        lines += ["", f"Kernels {name} ({result['builds'][name]}):", ""]
        lines += [
            "| kernel | instructions | sdot | smull/smlal | madd |",
            "|---|---|---|---|---|",
        ]
        for kernel, row in result[name]["kernels"].items():
            lines.append(
                f"| `{kernel}` | {row['instructions']} | {row['sdot']} | {row['widening_mul']} "
                f"| {row['madd']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=4, help="images per qemu run")
    p.add_argument("--repeat", type=int, default=10, help="timed runs under qemu")
    p.add_argument("--work", type=Path, help="a directory for the libraries (default: temp)")
    p.add_argument("--out", default=str(RESULTS / "arm_dot"), help="results path stem")
    args = p.parse_args()
    missing = tvm_deploy.aarch64_tools_missing()
    if missing:
        p.error(f"missing {', '.join(missing)}: run scripts/install_arm_tools.sh")
    work = args.work or Path(tempfile.mkdtemp(prefix="arm_dot."))
    torch.manual_seed(0)
    calib = torch.randn(16, *INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    gm = hyq_fx.quantize(SmallNet().eval(), calib, "minmax", 8, 8, progress=False)
    images = torch.randn(args.batch, *INPUT_SHAPE, generator=torch.Generator().manual_seed(1))
    builds = {"before": "arm_dot=False", "after": "arm_dot=True"}
    result: dict[str, Any] = {
        "machine": machine(),
        "command": command_line(),
        "model": f"{SmallNet.__doc__.rstrip('.')}, minmax W8A8, {'×'.join(map(str, INPUT_SHAPE))}",
        "target": "aarch64 (llvm -mtriple=aarch64-linux-gnu -mattr=+neon,+dotprod)",
        "batch": args.batch,
        "repeat": args.repeat,
        "builds": builds,
    }
    for name, arm_dot in (("before", False), ("after", True)):
        result[name] = measure(
            gm, images, work / f"{name}.aarch64.so", args.repeat, arm_dot=arm_dot
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
