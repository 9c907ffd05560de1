"""The CPU build pipeline of the TVM backend, with optional MetaSchedule tuning of its kernels.

``LegalizeOps`` turns every Relax op into a TIR kernel with *no* schedule: plain loop nests,
one thread, no vectorization. TVM's ``tvm.compile(..., relax_pipeline="default")`` on CPU does
not even fuse them (each quantize's divide / round / add / clip / cast is its own kernel).
``cpu_pipeline`` runs TVM's CPU pipeline instead (``relax.backend.cpu_generic``: legalize,
``FoldConstant``, ``FuseOps``, ``FuseTIR``, then lowering), and between fusion and lowering it
can tune::

    for each fused kernel k (a MetaSchedule task, weighted by how often it is called):
        search schedules σ (tiling, loop order, parallel, vectorize, unroll) for
        min_σ  t_measured(k, σ)  on this machine, within the global trial budget
    apply the best σ of each kernel found in the database; kernels without a record keep
    the unscheduled default

The database (``database_workload.json``, ``database_tuning_record.json`` and MetaSchedule's
logs) lives in a directory beside the library (``OUT/model.llvm.tuning/``); building again with
the same directory reuses its records, and ``trials=0`` applies them without searching, so a
tuned library can be rebuilt in seconds. Tuning again on a database spends the trials on the
kernels that have no record yet, if any (MetaSchedule visits tasks in order until the budget
is spent, so without this the kernels at the end of a model never got a trial: 5 of
mobilevit_xxs's 74 conv/matmul kernels after 2700 trials, the costliest one among them).
Tuning needs static shapes (a record is keyed on the kernel's structure, shapes included) and
a machine that runs the kernels: the host CPU.

Source: Shao et al., "Tensor Program Optimization with Probabilistic Programs" (MetaSchedule,
NeurIPS 2022). Invariants checked by ``tests/test_tvm_backend.py``, with the search replaced
by untimed records (deterministic): a tuning writes its database beside the library, a rebuild
applies it without searching, tuning again goes to the kernels without a record, the library
matches the fake-quant model (1e-4), and MetaSchedule's logging setup survives a second tuning
in one process. ``benchmarks/tuning_check.py`` runs a real search.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TuningOptions", "build_candidate", "cpu_pipeline", "tuning_target"]

# MetaSchedule's logger, and the handlers its logging setup (``create_loggers``) defines on it
_METASCHEDULE_LOGGER = "tvm.s_tir.meta_schedule"
_METASCHEDULE_HANDLERS = (f"{_METASCHEDULE_LOGGER}.console", f"{_METASCHEDULE_LOGGER}.file")


@dataclass
class TuningOptions:
    """How to tune: a global trial budget and where the database lives.

    ``trials`` is MetaSchedule's ``max_trials_global`` (0: apply the database only);
    ``ops``: tune only the fused kernels whose name holds one of these op names (default conv2d
    and matmul, where the time goes; None tunes every kernel, elementwise ones included, but
    then MetaSchedule 0.27 can keep revisiting kernels whose few candidates are all measured,
    without adding trials: on mobilevit_xxs it stalled at 419 of 848 trials and was stopped;
    the records up to there apply);
    ``trials_per_task`` caps one kernel (default: ``max(1, trials // tasks)`` so every kernel
    gets a share); ``trials_per_iter`` is the candidates measured per round (at most the cap).
    After the build ``summary`` holds what happened (tasks, records, kernels tuned, seconds).
    """

    work_dir: Path
    trials: int = 0
    ops: tuple[str, ...] | None = ("conv2d", "matmul")
    trials_per_task: int | None = None
    trials_per_iter: int = 16
    summary: dict[str, Any] = field(default_factory=dict)


def tuning_target(target: Any) -> Any:
    """``target`` with ``num-cores`` set (MetaSchedule needs it to parallelize CPU kernels)."""
    import tvm

    config = dict(target.export())
    config.pop("tag", None)
    config.setdefault("num-cores", os.cpu_count() or 1)
    return tvm.target.Target(config)


def _cost_model() -> str:
    # MetaSchedule's learned cost model needs xgboost (`pip install hyq-fx[tune]`); without it
    # candidates are ranked at random, which needs more trials for the same result
    return "xgb" if importlib.util.find_spec("xgboost") is not None else "random"


def _scheduled_kernels(mod: Any) -> tuple[int, int]:
    import tvm

    kernels = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    tuned = sum(1 for f in kernels if f.attrs is not None and "tirx.is_scheduled" in f.attrs)
    return tuned, len(kernels)


def build_candidate(mod: Any, target: Any, _params: Any) -> Any:
    """MetaSchedule's default candidate build without its ``import tvm.s_tir.tensor_intrin``.

    That import parses every tensor intrinsic TVM ships (CUDA, ARM, Hexagon, ...): 27-90 s on a
    2-core CPU (CUDA's are most of it), paid by every build worker, and MetaSchedule starts new
    workers for each batch of candidates, so every build timed out. The candidates arrive
    already scheduled (any tensorization was done in the tuning process), so building them
    needs no intrinsic table.
    Candidates get ``build_tvm``'s fast ``exp`` lowering, so they are timed as they will run.
    """
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from hyq_fx.backends.tvm_fast_exp import fast_exp

    with fast_exp():  # a worker process starts with it off
        return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _detach_foreign_log_handlers() -> None:
    """Detach from MetaSchedule's logger every handler that its logging setup did not define.

    Each tuning re-configures the logger ``tvm.s_tir.meta_schedule`` (MetaSchedule 0.27's
    ``create_loggers``, through ``logging.config.dictConfig``) and lists the handlers attached
    to it *by name*: one without a name fails the setup (``AttributeError: 'NoneType' object
    has no attribute 'format'``), one with a name the config does not define fails it too
    (``ValueError: Unable to configure logger``). The first setup makes that logger
    non-propagating, and pytest attaches its unnamed capture handlers to every non-propagating
    logger at each test phase, so a second tuning in a pytest process always failed.
    ``dictConfig`` removes every handler of the logger before adding the configured ones, so
    detaching the others first changes nothing else. Invariant: afterwards the logger holds
    only handlers named ``tvm.s_tir.meta_schedule.console`` / ``.file``.
    """
    logger = logging.getLogger(_METASCHEDULE_LOGGER)
    for handler in list(logger.handlers):
        if handler.get_name() not in _METASCHEDULE_HANDLERS:
            logger.removeHandler(handler)


def _tune(mod: Any, target: Any, options: TuningOptions) -> None:
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.relax_integration import extracted_tasks_to_tune_contexts

    every = ms.relax_integration.extract_tasks(mod, target)
    tasks = [t for t in every if not options.ops or any(op in t.task_name for op in options.ops)]
    if every and not tasks:
        names = sorted({t.task_name for t in every})
        raise ValueError(
            f"tune ops {list(options.ops)} name none of the {len(every)} fused kernels (e.g. "
            f"{', '.join(names[:3])}); use op names such as conv2d, matmul, softmax, or 'all'"
        )
    # MetaSchedule visits tasks in order until the global budget is spent, so a database that
    # ran out before the last kernels would get the same first kernels again on every resume
    untuned = _without_records(tasks, target, options.work_dir)
    if untuned and len(untuned) < len(tasks):
        options.summary["tasks_with_records_skipped"] = len(tasks) - len(untuned)
        tasks = untuned
    # every task gets its share of the budget (at least one trial): a task MetaSchedule never
    # reaches keeps an unscheduled, single-threaded loop nest
    per_task = options.trials_per_task or max(1, options.trials // max(len(tasks), 1))
    cost_model = _cost_model()
    _detach_foreign_log_handlers()  # the contexts set up MetaSchedule's logging
    contexts, weights = extracted_tasks_to_tune_contexts(tasks, str(options.work_dir), seed=0)
    start = time.perf_counter()
    ms.tune.tune_tasks(
        tasks=contexts,
        task_weights=weights,
        work_dir=str(options.work_dir),
        max_trials_global=options.trials,
        max_trials_per_task=per_task,
        num_trials_per_iter=min(options.trials_per_iter, per_task, options.trials),
        cost_model=cost_model,
        builder=ms.builder.LocalBuilder(f_build=build_candidate, timeout_sec=60),
    )
    options.summary.update(
        tasks=len(tasks),
        trials_per_task=per_task,
        cost_model=cost_model,
        tune_seconds=round(time.perf_counter() - start, 1),
    )


def _without_records(tasks: list, target: Any, work_dir: Path) -> list:
    """The tasks for which the database in ``work_dir`` holds no tuning record."""
    from tvm.s_tir import meta_schedule as ms

    if not (work_dir / "database_tuning_record.json").is_file():
        return list(tasks)
    db = ms.database.JSONDatabase(work_dir=str(work_dir))
    return [
        t for t in tasks if db.query_tuning_record(t.dispatched[0], target, t.task_name) is None
    ]


def _record_count(work_dir: Path) -> int:
    records = work_dir / "database_tuning_record.json"
    if not records.is_file():
        return 0
    return sum(1 for line in records.read_text().splitlines() if line.strip())


def cpu_pipeline(
    target: Any, tuning: TuningOptions | None = None, kernel_passes: Sequence[Any] = ()
) -> Any:
    """TVM's CPU Relax pipeline (fusion included), tuning the fused kernels if ``tuning``.

    ``kernel_passes`` run on the module of fused kernels after legalization (and after any
    tuning records were applied), before lowering: fixed schedules such as
    ``tvm_arm_dot.ScheduleArmDotKernels`` (aarch64 ``sdot``), which replace a search where the
    kernels cannot be timed.
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0, name="hyq.CpuPipeline")
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            mod = tvm.transform.Sequential(
                cpu.library_dispatch_passes(target) + cpu.legalize_passes(target)
            )(mod)
            if tuning is not None:
                tuning.work_dir.mkdir(parents=True, exist_ok=True)
                if tuning.trials > 0:
                    _tune(mod, target, tuning)
                mod = relax.transform.MetaScheduleApplyDatabase(str(tuning.work_dir))(mod)
                tuned, kernels = _scheduled_kernels(mod)
                tuning.summary.update(
                    database=str(tuning.work_dir),
                    trials=tuning.trials,
                    records=_record_count(tuning.work_dir),
                    kernels=kernels,
                    kernels_from_database=tuned,
                )
            if kernel_passes:
                mod = tvm.transform.Sequential(list(kernel_passes))(mod)
            return tvm.transform.Sequential(
                cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target)
            )(mod)

    return _pipeline
