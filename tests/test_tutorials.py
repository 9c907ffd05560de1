"""Every tutorial runs as a script (CI keeps the walkthroughs working)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("[0-9][0-9]_*.py"))


def test_all_five_walkthroughs_are_collected():
    assert {"01", "02", "03", "04", "05"} <= {t.stem[:2] for t in TUTORIALS}


@pytest.mark.parametrize("script", TUTORIALS, ids=[t.stem for t in TUTORIALS])
def test_tutorial_runs(script, tmp_path):
    env = {**os.environ, "HYQ_TUTORIAL_OUT": str(tmp_path), "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=script.parents[1], env=env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip(), "a tutorial prints what it shows"
    assert any(tmp_path.iterdir()), "a tutorial writes its figures"
