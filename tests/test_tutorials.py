"""Every tutorial runs as a script (CI keeps the walkthroughs working).

The five scripts run two at a time, each with one torch thread: most of a tutorial is
single-threaded Python (``torch.export``, graph passes, TVM's LLVM codegen), so on CI's two
cores this takes about half the time of running them one after the other.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("[0-9][0-9]_*.py"))


def test_all_five_walkthroughs_are_collected():
    assert {"01", "02", "03", "04", "05"} <= {t.stem[:2] for t in TUTORIALS}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    def run(script: Path) -> tuple[subprocess.CompletedProcess, Path]:
        out = tmp_path_factory.mktemp(script.stem)
        env = {**os.environ, "HYQ_TUTORIAL_OUT": str(out), "MPLBACKEND": "Agg",
               "OMP_NUM_THREADS": "1"}  # fmt: skip
        proc = subprocess.run(
            [sys.executable, str(script)], cwd=script.parents[1], env=env,
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        return proc, out

    longest_first = sorted(TUTORIALS, reverse=True)  # 05 and 04 are the long ones
    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(longest_first, pool.map(run, longest_first), strict=True))
    return {script.stem: result for script, result in done.items()}


@pytest.mark.parametrize("script", TUTORIALS, ids=[t.stem for t in TUTORIALS])
def test_tutorial_runs(script, runs):
    proc, out = runs[script.stem]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip(), "a tutorial prints what it shows"
    assert any(out.iterdir()), "a tutorial writes its figures"
