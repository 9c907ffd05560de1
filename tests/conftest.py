"""Shared fixtures: small captured models at random init, and the ../shared data when present."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch

import hyq_fx

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available (the ../shared folder beside the project)")
    return path


@pytest.fixture()
def one_thread():
    """Small ops on a shared, loaded machine run faster (and steadier) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def xxs_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("mobilevit_xxs", num_classes=10).eval()


@pytest.fixture(scope="session")
def xxs_input() -> torch.Tensor:
    return torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def _xxs_captured(xxs_model, xxs_input):
    return hyq_fx.capture(xxs_model, xxs_input[:2])


@pytest.fixture()
def xxs_gm(_xxs_captured):
    """A fresh copy of the captured mobilevit_xxs graph (passes rewrite in place)."""
    return copy.deepcopy(_xxs_captured)


class UntimedSearch:
    """MetaSchedule's search replaced by records committed without building or timing anything.

    The ``untimed_search`` fixture puts it in place of ``meta_schedule.tune.tune_tasks`` (and of
    the candidate builder, whose worker start alone takes seconds), so ``build_tvm(...,
    tune_trials=N)`` runs hyq-fx's own tuning code (the choice of tasks, the skipping of tasks
    with a record, MetaSchedule's task contexts and logging setup, the database beside the
    library) deterministically. Like MetaSchedule it visits the tasks in order, each up to its
    per-task cap, until the global trial budget is spent; every visited task gets one record:
    its kernel as ``schedule`` leaves it, timed at a fixed ``RUN_SECONDS``.

    The default ``schedule`` runs the outermost loop of the kernel's output block in parallel:
    a valid schedule of any kernel, and not an empty trace (TVM 0.27 never applies a record
    whose trace is empty). ``visited`` holds the task names of each call, in order.
    """

    RUN_SECONDS = 1e-6

    def __init__(self) -> None:
        self.schedule = self.parallel_output_loop
        self.visited: list[list[str]] = []

    @staticmethod
    def parallel_output_loop(sch) -> None:
        output_block = sch.get_child_blocks(sch.get_sblock("root"))[-1]
        sch.parallel(sch.get_loops(output_block)[0])

    def __call__(self, *, tasks, work_dir, max_trials_global, max_trials_per_task, **_):
        from tvm import s_tir
        from tvm.s_tir import meta_schedule as ms

        database = ms.database.JSONDatabase(work_dir=work_dir)
        visited, budget = [], max_trials_global
        for task in tasks:
            if budget <= 0:
                break
            budget -= min(max_trials_per_task, budget)
            sch = s_tir.Schedule(task.mod)
            self.schedule(sch)
            record = ms.database.TuningRecord(
                sch.trace,
                database.commit_workload(task.mod),
                [self.RUN_SECONDS],
                task.target,
                ms.arg_info.ArgInfo.from_prim_func(task.mod["main"]),
            )
            database.commit_tuning_record(record)
            visited.append(task.task_name)
        self.visited.append(visited)
        return database


@pytest.fixture()
def untimed_search(monkeypatch) -> UntimedSearch:
    """MetaSchedule tuning without a search for this test (see ``UntimedSearch``)."""
    from tvm.s_tir import meta_schedule as ms

    search = UntimedSearch()
    monkeypatch.setattr(ms.tune, "tune_tasks", search)
    monkeypatch.setattr(ms.builder, "LocalBuilder", lambda **_: None)
    return search
