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
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import timm

    import hyq_fx

    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
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
