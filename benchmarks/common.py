"""Shared helpers of the benchmark scripts: machine description, resumable JSON results."""

from __future__ import annotations

import fcntl
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# ../shared beside the project; HYQ_SHARED points elsewhere (e.g. a copy taken to a GPU machine)
SHARED = Path(os.environ.get("HYQ_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")


def machine() -> dict[str, Any]:
    fields: dict[str, str] = {}
    try:  # the first processor's entries
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = fields.get("model name") or platform.processor() or ""
    flags = set(fields.get("flags", "").split())
    # int8 speed depends on these: VNNI has the u8 x s8 -> s32 dot-product instruction
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    import timm

    import hyq_fx

    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "isa": "+".join(isa) or "unknown",
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "hyq_fx": hyq_fx.__version__,
    }
    try:
        info["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


# the weight / activation bit widths the accuracy benchmarks run
SETTINGS = {"W8A8": (8, 8), "W6A6": (6, 6), "W4A8": (4, 8), "W4A4": (4, 4)}


def markdown_header(title: str, data: dict[str, Any]) -> list[str]:
    """The first lines of a results ``.md``: title, the command and the machine of ``data``."""
    machine_ = ", ".join(f"{k} {v}" for k, v in data.get("machine", {}).items())
    command = data.get("command", "")
    return [f"# {title}", "", f"Command: `{command}`", "", f"Machine: {machine_}", ""]


def command_line() -> str:
    return " ".join(["python", *sys.argv])


class ResultStore:
    """Rows keyed by a string, saved after each one so an interrupted run resumes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"rows": {}}
        if path.exists():
            self.data = json.loads(path.read_text())

    def has(self, key: str) -> bool:
        return key in self.data["rows"]

    def get(self, key: str) -> Any:
        return self.data["rows"][key]

    def put(self, key: str, row: dict[str, Any]) -> None:
        """Add a row; rows that other processes saved meanwhile are kept (runs may go in
        parallel, e.g. one per model)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.exists():
                on_disk = json.loads(self.path.read_text()).get("rows", {})
                self.data["rows"] = {**on_disk, **self.data["rows"]}
            self.data["rows"][key] = row
            self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)


def load_quantized(name: str, recipe: str, calib_size: int, work: Path):
    """``(model, info, calib_dataset, qgm)`` for a shared checkpoint, quantized at W8A8 with
    ``recipe`` on ``calib_size`` calibration images; the artifact is cached in ``work``."""
    import time

    import hyq_fx
    from hyq_fx.artifact import is_artifact
    from hyq_fx.data import image_folder, make_loader
    from hyq_fx.models import load_model

    model, info = load_model(f"local-dir:{SHARED / 'checkpoints' / name}")
    calib = image_folder(SHARED / "data" / "cifar10" / "calib", info, limit=calib_size)
    qdir = Path(work) / f"{name}.{recipe}.W8A8.c{calib_size}"
    if is_artifact(qdir):
        return model, info, calib, hyq_fx.load(qdir)
    start = time.perf_counter()
    qgm = hyq_fx.quantize(model, make_loader(calib, batch_size=32), recipe, 8, 8)
    qgm.meta["hyq"]["model_info"] = info
    print(f"{name}: quantized in {time.perf_counter() - start:.0f} s", flush=True)
    hyq_fx.save(qgm, qdir)
    return model, info, calib, qgm
