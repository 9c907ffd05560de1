"""``benchmarks/tuning_db.py``: a packed MetaSchedule database keeps the fastest record of each
kernel (never a failed one) and unpacks to the two files ``build_tvm`` reads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "tuning_db.py"
_spec = importlib.util.spec_from_file_location("tuning_db", _PATH)
tuning_db = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tuning_db)


def _record(workload: int, seconds: list[float], tag: str) -> str:
    return json.dumps([workload, [[tag], seconds, {"kind": "llvm"}, []]])


def test_pack_keeps_the_fastest_valid_record_per_kernel_and_unpacks(tmp_path):
    db = tmp_path / "db"
    db.mkdir()
    (db / tuning_db.WORKLOADS).write_text('["1", "a"]\n["2", "b"]\n["3", "c"]\n')
    lines = [
        _record(0, [3e-6, 5e-6], "slow"),
        _record(0, [2e-6, 2e-6], "fast"),
        _record(0, [1e10], "failed"),  # a candidate that did not build: never kept
        _record(1, [1e-5], "only"),
        _record(2, [1e10], "failed"),  # no valid record: the kernel is left out
    ]
    (db / tuning_db.RECORDS).write_text("\n".join(lines) + "\n")
    assert tuning_db.pack(db, tmp_path / "seed") == {"records": 5, "kept": 2}

    out = tmp_path / "unpacked"
    tuning_db.unpack(tmp_path / "seed", out)
    kept = [json.loads(line) for line in (out / tuning_db.RECORDS).read_text().splitlines()]
    assert [(r[0], r[1][0][0]) for r in kept] == [(0, "fast"), (1, "only")]
    assert (out / tuning_db.WORKLOADS).read_text() == (db / tuning_db.WORKLOADS).read_text()
    with pytest.raises(SystemExit, match="already holds a database"):
        tuning_db.unpack(tmp_path / "seed", out)
    with pytest.raises(SystemExit, match="not a packed tuning database"):
        tuning_db.unpack(db, tmp_path / "elsewhere")
