"""Pack a MetaSchedule database into a small seed, or unpack a seed where ``build_tvm`` finds it.

A tuning run writes every measured candidate (``database_tuning_record.json``, 1954 lines for
mobilevitv2_050 after three rounds) and the kernels' IR (``database_workload.json``, 16 MB).
Only the fastest record of each kernel is ever applied, so ``pack`` keeps that one and gzips
both files (about 2 MB for the v2 seed: 206 kernels, both conv layouts). It reads the JSON
lines itself rather than through MetaSchedule's ``Database.dump_pruned``: loading a database
replays every record's trace, which for the VNNI kernels needs ``register_vnni_intrinsic``
first.
``unpack`` writes them back as a database directory, e.g. the default one beside a library
(``OUT/model.llvm.tuning``), which ``hyq-fx export OUT --to tvm --batch 1 --tune-trials 0``
then applies, and a later ``--tune-trials N`` resumes from.

Records are keyed on a kernel's structure and shapes, not on weight values: a seed applies to
any W8A8 artifact of the same model, input size and batch. Schedules are timed on the machine
that tuned them; on another CPU with the same ISA they run, but may not be the best there.

    python benchmarks/tuning_db.py pack /tmp/db benchmarks/tuning/mobilevitv2_050.b1.vnni
    python benchmarks/tuning_db.py unpack benchmarks/tuning/mobilevitv2_050.b1.vnni \\
        out/v2-w8a8/model.llvm.tuning
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
from pathlib import Path

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
FAILED = 1e9  # MetaSchedule stores 1e10 s for a candidate that did not build or run


def _mean_seconds(record: list) -> float:
    times = [float(t) for t in record[1][1] or []]
    return sum(times) / len(times) if times else float("inf")


def pack(db: Path, seed: Path) -> dict[str, int]:
    """Write the best record of each kernel of ``db`` and its workloads, gzipped, to ``seed``."""
    records = [json.loads(line) for line in (db / RECORDS).read_text().splitlines() if line]
    best: dict[int, list] = {}
    for record in records:
        if _mean_seconds(record) >= FAILED:
            continue
        held = best.get(record[0])
        if held is None or _mean_seconds(record) < _mean_seconds(held):
            best[record[0]] = record
    seed.mkdir(parents=True, exist_ok=True)
    with gzip.open(seed / f"{RECORDS}.gz", "wt") as f:
        f.writelines(json.dumps(best[k], separators=(",", ":")) + "\n" for k in sorted(best))
    with open(db / WORKLOADS, "rb") as src, gzip.open(seed / f"{WORKLOADS}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    return {"records": len(records), "kept": len(best)}


def unpack(seed: Path, db: Path) -> None:
    """Write ``seed``'s two files into the database directory ``db`` (created if needed)."""
    missing = [n for n in (WORKLOADS, RECORDS) if not (seed / f"{n}.gz").is_file()]
    if missing:
        raise SystemExit(f"{seed} is not a packed tuning database: no {missing[0]}.gz in it")
    if any((db / n).exists() for n in (WORKLOADS, RECORDS)):
        raise SystemExit(f"{db} already holds a database; unpack into an empty directory")
    db.mkdir(parents=True, exist_ok=True)
    for name in (WORKLOADS, RECORDS):
        with gzip.open(seed / f"{name}.gz", "rb") as src, open(db / name, "wb") as dst:
            shutil.copyfileobj(src, dst)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, src, dst in (("pack", "db", "seed"), ("unpack", "seed", "db")):
        s = sub.add_parser(name)
        s.add_argument(src, type=Path)
        s.add_argument(dst, type=Path)
    args = p.parse_args()
    if args.command == "pack":
        print(pack(args.db, args.seed))
    else:
        unpack(args.seed, args.db)


if __name__ == "__main__":
    main()
