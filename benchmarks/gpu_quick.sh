#!/usr/bin/env bash
# A short GPU check for a lease with little time left (~4 minutes): build
# with the system compiler, check that C++ errors arrive as exceptions, run
# the native unit tests that failed on the first H200 run and the Triton
# tests of what changed without a GPU in session 4 (fast launches on repeated
# calls, both 3x3 loop forms, weight gradients in the weight's layout with
# split sums, autocast with 1x1 fp32 weights cast in the kernels), time the
# ResNet-164 units (eager vs native vs triton, with CUDA-graph device time),
# then their kernel-by-kernel device time from the profiler (kernel_times.py,
# autotuned: it lists which 3x3 loop form won).
#   bash benchmarks/gpu_quick.sh OUTDIR
set -u -o pipefail
OUT=$(realpath -m "${1:?usage: gpu_quick.sh OUTDIR}")
mkdir -p "$OUT"
LOG=$OUT/gpu_quick.log
# shellcheck source=benchmarks/gpu_common.sh
. "$(dirname "$0")/gpu_common.sh"
step build 75 env "${BUILD_ENV[@]}" $PY setup.py build_ext --inplace
step exceptions 20 $PY -c "
import torch, fused_preact
for dev in ('cpu', 'cuda'):
    try:
        torch.ops.fused_preact.bn_stats(torch.randn(2, 4, 3, device=dev))
    except RuntimeError as e:
        print(dev, 'raised:', str(e).splitlines()[0])"
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
step tests 40 $PY -m pytest -q -rfE $XDIST -p no:cacheprovider -p no:benchmark tests/test_native_ops.py \
  -k "(native_unit_matches_the_reference and cuda) or bad_input or zero_size"
step triton_tests 90 env FUSED_PREACT_TRITON_AUTOTUNE=0 $PY -m pytest -q -rfE $XDIST -p no:cacheprovider \
  -p no:benchmark tests/test_triton.py tests/test_integration.py \
  -k "repeated or reduction_loops or weights_layout or float32 or emitted or autocast"
step bench 70 env FUSED_PREACT_TRITON_AUTOTUNE=0 $PY -m fused_preact.bench --device cuda --suite units \
  --units resnet164 --dtype bfloat16 --providers eager_cl,native,triton --repeats 20 --warmup 3 \
  --cuda-graph --warm-workers 12 --no-progress --out "$OUT/bench"
step kernel_times 90 $PY benchmarks/kernel_times.py --units resnet164 --out "$OUT/kernel_times"
grep -E "raised|passed|failed|=== " "$LOG" | tail -n 14
sed -n '/## Units/,/### The same/p' "$OUT/bench/report.md" 2>/dev/null
head -n 20 "$OUT/kernel_times/kernel_times.md" 2>/dev/null
echo "gpu_quick finished in $(($(date +%s) - T0))s"
