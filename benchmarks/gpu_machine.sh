#!/usr/bin/env bash
# What runs on a lent GPU machine (16 cores, one NVIDIA GPU, no network, its own torch/timm),
# which receives only a copy of the working tree (64 MiB). Prepared here beforehand, all in
# .git/info/exclude (nothing from ../shared is committed):
#   .tvm-device/        runtime-only TVM (the tvm package without libtvm_compiler.so, 2.7 MB xz)
#                       and the cp312 apache-tvm-ffi wheel
#   .shared-copy/       checkpoints/ and data/cifar10/{calib,dev} of ../shared (HYQ_SHARED)
#   .gpu-bundle.tar.xz  CUDA libraries and reference logits (python benchmarks/cuda.py prepare,
#                       then tar cJf .gpu-bundle.tar.xz .gpu-bundle: the libraries shrink 8x)
#   .device-resume/NAME.json  (optional) rows of an interrupted accuracy run NAME
#
#   bash benchmarks/gpu_machine.sh setup                # unpack TVM, install hyq-fx (no deps)
#   bash benchmarks/gpu_machine.sh cuda                 # cuda.py measure → $OUT/cuda.{json,log}
#   bash benchmarks/gpu_machine.sh accuracy SECONDS NAME [accuracy.py options]
#        # accuracy.py --eval-device cuda, stopped after SECONDS (rerun to resume);
#        # → $OUT/NAME.json, NAME.md, NAME_logs.tgz
set -euo pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
export PYTHONPATH=/tmp/hyq:/tmp/site HYQ_SHARED=$PWD/.shared-copy
mkdir -p "$OUT"

case "$1" in
  setup)
    mkdir -p /tmp/site /tmp/hyq
    tar xJf .tvm-device/tvm-runtime.tar.xz -C /tmp/site
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .tvm-device/apache_tvm_ffi-*.whl
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/hyq .
    if [ -f .gpu-bundle.tar.xz ]; then tar xJf .gpu-bundle.tar.xz; fi
    nvidia-smi -L
    lscpu | grep -E "Model name|^CPU\(s\)"
    echo "int8 CPU features: $(grep -o -w 'avx2\|avx512f\|avx512_vnni\|avx_vnni\|amx_int8' /proc/cpuinfo | sort -u | tr '\n' ' ')"
    (cd /tmp && python3 -c "import torch, timm, hyq_fx; print('torch', torch.__version__, 'timm', timm.__version__)")
    ;;
  cuda)
    # TVM 0.27 libraries hold CUDA C++ that the loader compiles (nvrtc through cuda-bindings,
    # or nvcc with TVM_CUDA_COMPILE_MODE=nvcc)
    (cd /tmp && python3 -c "from cuda.bindings import nvrtc" 2>&1 | tail -1) || true
    TVM_CUDA_COMPILE_MODE=${TVM_CUDA_COMPILE_MODE:-nvcc} TVM_USE_RUNTIME_LIB=1 python3 benchmarks/cuda.py measure --bundle .gpu-bundle --out "$OUT" \
      > "$OUT/cuda.log" 2>&1 || echo "cuda.py measure failed: $?"
    grep -v "it/s" "$OUT/cuda.log" | tail -30
    ;;
  accuracy)
    secs=$2 name=$3
    shift 3
    mkdir -p "/tmp/$name"
    if [ -f ".device-resume/$name.json" ]; then cp ".device-resume/$name.json" "/tmp/$name/$name.json"; fi
    status=0
    timeout "$secs" python3 benchmarks/accuracy.py --eval-device cuda --out "/tmp/$name/$name" "$@" \
      > "/tmp/$name/run.log" 2>&1 || status=$?
    cp "/tmp/$name/$name.json" "$OUT/" || true
    cp "/tmp/$name/$name.md" "$OUT/" 2>/dev/null || true
    tar czf "$OUT/${name}_logs.tgz" -C "/tmp/$name" --exclude="$name.json" . || true
    echo "$name: exit status $status (124: stopped by the time limit; rerun to resume)"
    ;;
esac
