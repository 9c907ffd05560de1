"""TVM Relax backend: a hyq-fx fake-quant GraphModule → a Relax VM shared library with int8 kernels.

Three steps, each checkable on its own, each in a module that states its equations:

1. ``lower_quantizers`` (torch, :mod:`~hyq_fx.backends.tvm_lower`): every ``FakeQuantizer``
   becomes explicit ATen ops with an int8 tensor in the middle (activations shifted to signed
   int8, ``x̂`` equal to ``FakeQuantizer(x)`` bit for bit; weights int8 constants).
2. ``import_relax`` (:mod:`~hyq_fx.backends.tvm_lower`): ``from_exported_program`` imports the
   exported graph; the dequantize ``(cast_f32(q) − z)·s`` is then the Relax pattern
   ``multiply(subtract(astype(q), const), const)``.
3. ``IntegerizeQDQ`` (a Relax module pass, :mod:`~hyq_fx.backends.tvm_integerize`) rewrites
   ``conv2d(DQ(x8), DQ(w8))`` and ``matmul(DQ(a8), DQ(b8))`` into int8 × int8 → int32 kernels
   plus a float requantization, exact in integer arithmetic (zero points subtracted in int32, a
   depthwise conv's per-channel input quantizer included); what integers cannot express exactly
   stays in float and is listed.

This module builds the library: ``build_tvm`` runs the three steps, NHWC convs on CPU targets
(:mod:`~hyq_fx.backends.tvm_layout`), AVX-512 VNNI kernels where the CPU has them
(:mod:`~hyq_fx.backends.tvm_vnni`), Armv8.2 ``sdot`` kernels on aarch64
(:mod:`~hyq_fx.backends.tvm_arm_dot`), TVM's CPU pipeline and optional MetaSchedule tuning
(:mod:`~hyq_fx.backends.tvm_tuning`) or its CUDA pipeline (``_cuda_pipeline``), and writes the
library and its ``.json``; ``export_tvm`` does it for a saved artifact. The runner
(``TvmRunner``, ``load_tvm``, ``is_tvm_library``, TVM's CUDA runtime) is
:mod:`~hyq_fx.backends.tvm_runner`. The names of those modules that this module held before it
was split are imported here, so ``hyq_fx.backends.tvm_relax.NAME`` still works.

Targets (``TARGETS``, described in ``TARGET_DESCRIPTIONS``): ``"llvm"`` (host CPU), ``"aarch64"``
(``llvm -mtriple=aarch64-linux-gnu +neon,+dotprod``, linked with ``aarch64-linux-gnu-gcc``),
``"aarch64-i8mm"`` (the same with ``+i8mm``), ``"cuda"`` (``sm_90`` with dlight GPU schedules; needs
``nvcc`` at build time), or any ``tvm.target.Target`` / target dict. Invariant checked by
``tests/test_tvm_backend.py``: the Relax IR after ``IntegerizeQDQ`` holds int8 conv2d / matmul with
int32 output and no float conv/matmul, and the built library reproduces the fake-quant model.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx

from hyq_fx.backends.tvm_arm_dot import (
    ScheduleArmDotKernels,
    UseArmDotKernels,
    arm_dot_available,
)
from hyq_fx.backends.tvm_integerize import (  # noqa: F401 (helpers re-exported)
    IntegerizeQDQ,
    IntegerizeStats,
    _aligned,
    _const_numpy,
    _DQPattern,
    _input_channel_qparams,
    _Operand,
    _rewrite_conv2d,
    _rewrite_depthwise_per_channel,
    _rewrite_matmul,
    _scalar_int,
    _valid_tap_sums,
    _zero_correction,
    count_ops,
    integerize,
)
from hyq_fx.backends.tvm_layout import ConvertChannelsLast
from hyq_fx.backends.tvm_lower import (  # noqa: F401 (helpers re-exported)
    _INPUT_RANKS,
    INT8_MAX,
    INT8_MIN,
    _activation_qparam_shape,
    _channel_shape,
    _DequantWeightInt8,
    _fold_channel_scaled_inputs,
    _get_attr,
    _input_rank,
    _QuantDequantInt8,
    _weight_codes,
    import_relax,
    lower_quantizers,
)
from hyq_fx.backends.tvm_runner import (  # noqa: F401 (CUDA runtime helpers re-exported)
    TvmBackendError,
    TvmRunner,
    _load_cuda_runtime,
    _metadata_path,
    _register_cuda_compiler,
    is_tvm_library,
    load_tvm,
)
from hyq_fx.backends.tvm_tuning import TuningOptions, cpu_pipeline, tuning_target
from hyq_fx.backends.tvm_vnni import (
    UseVnniKernels,
    register_vnni_intrinsic,
    vnni_available,
)
from hyq_fx.lowering import batch_norm_as_affine, lower_for_export

__all__ = [
    "TARGETS",
    "TARGET_DESCRIPTIONS",
    "TvmBackendError",
    "IntegerizeQDQ",
    "TvmRunner",
    "build_tvm",
    "count_ops",
    "export_tvm",
    "is_tvm_library",
    "import_relax",
    "integerize",
    "load_tvm",
    "lower_quantizers",
    "make_target",
]


TARGETS: dict[str, dict[str, Any]] = {
    "llvm": {"kind": "llvm"},
    "aarch64": {
        "kind": "llvm",
        "mtriple": "aarch64-linux-gnu",
        "mattr": ["+neon", "+dotprod"],
    },
    "aarch64-i8mm": {
        "kind": "llvm",
        "mtriple": "aarch64-linux-gnu",
        "mattr": ["+neon", "+dotprod", "+i8mm"],
    },
    "cuda": {"kind": "cuda", "arch": "sm_90", "host": {"kind": "llvm"}},
}
# one line per preset: the CPUs a library built for it runs on (``hyq-fx export --target``)
TARGET_DESCRIPTIONS: dict[str, str] = {
    "llvm": "this machine's CPU (LLVM's host detection): libraries for this CPU family",
    "aarch64": "64-bit ARM Linux/Android, Armv8.2-A + dot product (sdot): Cortex-A55/A76 and "
    "later, Snapdragon 845+, Graviton2+; not Cortex-A53/A72 (Raspberry Pi 3/4: SIGILL)",
    "aarch64-i8mm": "Armv8.6-A / Armv9 with int8 matrix multiply (i8mm: smmla): Cortex-A510/"
    "A710/X2 and later, Snapdragon 8 Gen 1+, Graviton3+; the int8 kernels are the sdot ones",
    "cuda": "NVIDIA GPU sm_90 (H100), dlight schedules; needs nvcc at build time",
}
CROSS_CC = {"aarch64": "aarch64-linux-gnu-gcc"}
# LLVM's objects carry DWARF debug info (a third of an int8 library's bytes): not shipped
LINK_OPTIONS = ["-Wl,--strip-debug"]


def make_target(target: str | Mapping[str, Any] | Any = "llvm", *, mcpu: str | None = None) -> Any:
    """A ``tvm.target.Target`` from a name in ``TARGETS``, a target dict, or a Target.

    ``"llvm"`` is the build machine's CPU (``mcpu`` from LLVM's host detection unless given):
    the library then runs on that CPU family.
    """
    import tvm

    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, str):
        if target not in TARGETS:
            raise TvmBackendError(
                f"unknown TVM target {target!r}; use one of {sorted(TARGETS)} or a target dict "
                "such as {'kind': 'llvm', 'mcpu': 'cascadelake'}"
            )
        config = dict(TARGETS[target])
        if target == "llvm":
            config["mcpu"] = mcpu or tvm.target.codegen.llvm_get_system_cpu()
    else:
        config = dict(target)
    try:
        return tvm.target.Target(config)
    except Exception as exc:
        raise TvmBackendError(f"invalid TVM target {config}: {exc}") from exc


def _target_name(target: Any) -> str:
    if target.kind.name == "cuda":
        return "cuda"
    triple = str(target.attrs.get("mtriple", "") or "")
    return "aarch64" if triple.startswith("aarch64") else target.kind.name


def _cuda_pipeline(target: Any, int8_tensor_cores: bool = False) -> Any:
    """TVM's CUDA pipeline, but a dlight rule that fails on a kernel hands it to the next rule.

    TVM 0.27's ``dlight.gpu.Matmul`` (int8 tensorization) raises a ScheduleError on some fused
    int8 1x1 convolutions (``compute-at``: "not a stage pipeline"); the kernel then gets the
    GEMV / reduction / fallback schedule instead of failing the whole build. On others (an
    int8 1x1 conv with a per-channel float epilogue, in MobileViT-v2) it crashes the process
    inside ``Tensorize``, which no ``except`` can catch: so int8 tensor-core tensorization is
    off unless ``int8_tensor_cores``; int8 × int8 → int32 kernels then run on CUDA cores
    (the same integer arithmetic, dlight's generic matmul schedule).
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.cuda import pipeline as cuda_backend
    from tvm.s_tir import dlight as dl

    class Tolerant(dl.ScheduleRule):
        def __init__(self, rule: Any) -> None:
            self.rule = rule

        def apply(self, func: Any, tgt: Any, tunable: bool) -> Any:
            if not int8_tensor_cores and isinstance(func, tvm.tirx.PrimFunc):
                func = func.with_attr("dlight.do_not_tensorize", True)
            try:
                return self.rule.apply(func, tgt, tunable)
            except Exception:  # a rule bug: let the next rule schedule this kernel
                return None

    rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction()]
    legalize = [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        dl.ApplyDefaultSchedule(*[Tolerant(r) for r in rules], dl.gpu.Fallback()),
    ]

    @tvm.transform.module_pass(opt_level=0, name="hyq.CudaPipeline")
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            seq = tvm.transform.Sequential(
                cuda_backend.library_dispatch_passes(target)
                + legalize
                + cuda_backend.dataflow_lower_passes(target)
                + cuda_backend.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


def _export(executable: Any, out_path: Path, name: str) -> None:
    from tvm.support import cc as tvm_cc

    out_path.parent.mkdir(parents=True, exist_ok=True)
    cross = CROSS_CC.get(name)
    if cross is None:
        executable.export_library(str(out_path), options=LINK_OPTIONS)
        return
    if shutil.which(cross) is None:
        raise TvmBackendError(
            f"cannot link the {name} library: the cross compiler {cross!r} is not on PATH; "
            "install it (Debian/Ubuntu: apt-get install -y gcc-aarch64-linux-gnu)"
        )
    executable.export_library(
        str(out_path), fcompile=tvm_cc.cross_compiler(cross), options=LINK_OPTIONS
    )


def build_tvm(
    gm: fx.GraphModule,
    example_input: torch.Tensor,
    target: str | Mapping[str, Any] | Any = "llvm",
    out_path: str | Path = "model.llvm.so",
    *,
    integer: bool = True,
    dynamic_batch: bool = True,
    mcpu: str | None = None,
    int8_tensor_cores: bool = False,
    tune_trials: int = 0,
    tuning_dir: str | Path | None = None,
    tune_ops: Sequence[str] | None = ("conv2d", "matmul"),
    fast_exp: bool = True,
    vnni: bool = True,
    channels_last: bool = True,
    arm_dot: bool = True,
) -> Path:
    """Build ``gm`` (a hyq-fx fake-quant GraphModule) into a Relax VM shared library.

    ``integer=True`` runs conv2d / linear / matmul as int8 × int8 → int32 (``IntegerizeQDQ``);
    ``integer=False`` builds the float graph (quantizers off) as the FP32 reference.
    ``dynamic_batch`` keeps the batch dimension symbolic (one library for any batch size); with
    False the library runs only ``example_input``'s batch size (``TvmRunner`` pads to it).
    ``int8_tensor_cores`` (cuda only) lets dlight tensorize int8 matmuls for tensor cores: faster
    where it works, but TVM 0.27 crashes on some kernels (see ``_cuda_pipeline``).
    Kernels use TVM's default (untuned) schedules unless ``tune_trials > 0`` (MetaSchedule on
    this CPU, ``llvm`` with a static batch only; see ``tvm_tuning``) or ``tuning_dir`` holds a
    database from an earlier tuning (default ``OUT/model.llvm.tuning`` beside ``out_path``,
    reused when it exists). ``tune_ops`` picks the fused kernels to tune by op name (None or
    ``["all"]``: all, the elementwise, softmax and layout kernels too). ``fast_exp`` lowers
    float32 ``exp`` (SiLU, sigmoid, softmax) on CPU targets to a vectorizable polynomial
    (``tvm_fast_exp``, ≤ 1e-6 relative) instead of one libm call per element. ``vnni`` runs
    the int8 conv2d / matmul with constant weights as AVX-512 VNNI dot products where the
    target CPU has them (``tvm_vnni``; same int32 results). ``channels_last`` runs the convs
    of CPU targets in NHWC (``tvm_layout``; exact), so that their per-channel epilogues
    vectorize. ``arm_dot`` runs them as Armv8.2 ``sdot`` dot products with a fixed schedule
    where the target is aarch64 with ``+dotprod`` (``tvm_arm_dot``; same int32 results). Writes
    ``out_path`` and a ``.json`` beside it (target, input shape, op counts, build seconds, the
    model's preprocessing), each through a temporary file renamed at the end.
    """
    import tvm

    from hyq_fx.artifact import atomic_output_file
    from hyq_fx.backends.tvm_fast_exp import fast_exp as exp_lowering
    from hyq_fx.quantize import META_KEY, quantizers_mode

    if not isinstance(gm, fx.GraphModule):
        raise TvmBackendError(f"build_tvm needs a hyq-fx GraphModule, got {type(gm).__name__}")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
        raise TvmBackendError("example_input must be an image batch tensor [N, C, H, W]")
    tvm_target = make_target(target, mcpu=mcpu)
    name = _target_name(tvm_target)
    out_path = Path(out_path)
    tuning = _tuning_options(name, out_path, dynamic_batch, tune_trials, tuning_dir)
    if tuning is not None:
        tuning.ops = None if tune_ops is None or list(tune_ops) == ["all"] else tuple(tune_ops)
        tvm_target = tuning_target(tvm_target)
    start = time.perf_counter()
    example_input = example_input.detach().float().cpu()
    gm = batch_norm_as_affine(lower_for_export(gm, example_input), example_input)
    if integer:
        lowered, report = lower_quantizers(gm)
    else:
        with quantizers_mode(gm, "off"):
            lowered, report = lower_quantizers(gm)
    mod = import_relax(lowered.eval(), example_input, dynamic_batch=dynamic_batch)
    stats: dict[str, IntegerizeStats] = {}
    vnni_counts: dict[str, int] = {}
    if integer:
        mod = IntegerizeQDQ(stats)(mod)
    channels_last = channels_last and name != "cuda"
    if channels_last:
        mod = ConvertChannelsLast()(mod)
    if integer and vnni and vnni_available(tvm_target):
        mod = UseVnniKernels(vnni_counts)(mod)
        if tuning is not None:  # tuning and its records tensorize with the intrinsic
            register_vnni_intrinsic()
    arm_dot_counts: dict[str, int] = {}
    kernel_passes = []
    if integer and arm_dot and arm_dot_available(tvm_target):
        mod = UseArmDotKernels(arm_dot_counts)(mod)
        kernel_passes.append(ScheduleArmDotKernels(arm_dot_counts))
    ops = count_ops(mod)
    if name == "cuda":
        pipeline = _cuda_pipeline(tvm_target, int8_tensor_cores)
    else:
        pipeline = cpu_pipeline(tvm_target, tuning, kernel_passes)
    with tvm_target, exp_lowering(fast_exp):
        executable = tvm.compile(mod, target=tvm_target, relax_pipeline=pipeline)
    # the library and its .json go to temporary files renamed at the end (the .json just
    # before the library): an interrupted export leaves no partial file under their names
    with atomic_output_file(out_path) as tmp_lib:
        _export(executable, tmp_lib, name)
        main = stats.get("main", IntegerizeStats())
        meta = {
            "format": "hyq-fx tvm-relax 1",
            "target": name,
            "target_config": str(tvm_target),
            "integer": integer,
            "int8_tensor_cores": bool(int8_tensor_cores and name == "cuda"),
            "fast_exp": bool(fast_exp and name != "cuda"),
            "vnni": vnni_counts or None,
            "arm_dot": arm_dot_counts or None,
            "channels_last": channels_last,
            "dynamic_batch": dynamic_batch,
            "batch": None if dynamic_batch else int(example_input.shape[0]),
            "input_shape": list(example_input.shape[1:]),
            "ops": ops,
            "integer_conv2d": main.conv2d,
            "integer_depthwise_per_channel": main.depthwise_per_channel,
            "integer_matmul": main.matmul,
            "float_fallbacks": main.skipped,
            "quantizers": {k: len(v) for k, v in report.items()},
            "build_seconds": round(time.perf_counter() - start, 2),
            "tuning": tuning.summary if tuning is not None else None,
            "model_info": dict(gm.meta.get(META_KEY, {}).get("model_info", {})),
        }
        with atomic_output_file(_metadata_path(out_path)) as tmp_meta:
            tmp_meta.write_text(json.dumps(meta, indent=2, default=str))
    return out_path


def _tuning_options(
    name: str,
    out_path: Path,
    dynamic_batch: bool,
    trials: int,
    work_dir: str | Path | None,
) -> TuningOptions | None:
    """What ``build_tvm`` should tune or apply, or None for TVM's default schedules."""
    if trials < 0:
        raise TvmBackendError(f"tune_trials must be >= 0, got {trials}")
    default_dir = out_path.with_suffix(".tuning")
    if trials == 0 and work_dir is None:
        # an earlier tuning's database beside the library is reused where it can apply
        if name != "llvm" or dynamic_batch or not default_dir.is_dir():
            return None
    if name != "llvm":
        raise TvmBackendError(
            f"MetaSchedule tuning measures kernels on this machine, so it needs the host "
            f"target 'llvm', not {name!r}; build {name} without tune_trials / --tune-trials"
        )
    if dynamic_batch:
        raise TvmBackendError(
            "MetaSchedule tuning needs static shapes: build with dynamic_batch=False "
            "(`hyq-fx export --tune-trials N` does this, with --batch N, default 1)"
        )
    return TuningOptions(Path(work_dir) if work_dir is not None else default_dir, trials)


def export_tvm(
    out_dir: str | Path,
    target: str | Mapping[str, Any] = "llvm",
    out_path: str | Path | None = None,
    **options: Any,
) -> Path:
    """Build the quantized artifact in ``out_dir`` for ``target``: ``OUT/model.TARGET.so``.

    What ``hyq-fx export OUT --to tvm --target TARGET`` runs (TARGET: llvm, aarch64, cuda);
    ``options`` go to :func:`build_tvm` (``integer``, ``dynamic_batch``, ``mcpu``,
    ``tune_trials``, ``tuning_dir``, ``tune_ops``, ``vnni``). ``batch`` (an option here) sets
    the example batch size; with ``tune_trials`` (0 included: apply the database beside the
    library without searching) the library is then built for that batch only.
    """
    from hyq_fx.artifact import is_artifact, load
    from hyq_fx.quantize import META_KEY

    if not is_artifact(out_dir):
        raise TvmBackendError(
            f"{out_dir} is not a quantized model directory (no graph.json); create one with "
            "`hyq-fx quantize MODEL --calib DIR --out OUT`"
        )
    gm = load(out_dir)
    shape = gm.meta.get(META_KEY, {}).get("input_shape")
    if not shape:
        raise TvmBackendError(f"{out_dir}: the artifact does not record its input shape")
    batch = int(options.pop("batch", 1))
    if batch < 1:
        raise TvmBackendError(f"batch must be >= 1, got {batch}")
    if options.get("tune_trials") is None:
        options.pop("tune_trials", None)  # no tuning asked for: one library for any batch
    else:  # a tuning database applies to static shapes only
        options.setdefault("dynamic_batch", False)
    example = torch.zeros(batch, *shape)
    name = _target_name(make_target(target, mcpu=options.get("mcpu")))
    path = Path(out_path) if out_path else Path(out_dir) / f"model.{name}.so"
    return build_tvm(gm, example, target, path, **options)
