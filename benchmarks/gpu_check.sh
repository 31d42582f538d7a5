#!/usr/bin/env bash
# One prepared check on a fresh GPU machine (torch, triton, nvcc installed; no
# internet): build the extension, run the GPU tests, run the GPU benchmark,
# and leave logs, results.json, report.md and plots in OUTDIR.
#
#   bash benchmarks/gpu_check.sh OUTDIR [bench suites, default units,cifar,imagenet]
#
# Sized for <= 10 minutes on one H100: sm_90 only, MAX_JOBS = cores, the GPU
# tests on 8 processes without autotuning, the benchmark's Triton kernels
# compiled in parallel before timing. Every step has its own time limit and
# the script goes on after a failed step (each step's status is in the log).
set -u -o pipefail
OUT=$(realpath -m "${1:?usage: gpu_check.sh OUTDIR [suites]}")
SUITES=${2:-units,cifar,imagenet}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
# shellcheck source=benchmarks/gpu_common.sh
. "$(dirname "$0")/gpu_common.sh"

step environment 30 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv;
  $PY -c 'import sys, torch, triton; print(sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, torch.cuda.get_device_name())';
  nvcc --version | tail -n 2; nproc; git log -1 --format='commit %H %s' 2>/dev/null || true"
step build 150 env "${BUILD_ENV[@]}" $PY setup.py build_ext --inplace
# Errors raised from the C++ ops must reach Python as exceptions (one run
# segfaulted here): check it alone first, with the C++ runtime it loaded.
step exceptions 60 bash -c "ldd fused_preact/_C*.so | grep -Ei 'stdc|gcc_s|torch' ; which g++ c++ gcc; g++ --version | head -n1;
  $PY -X faulthandler -c \"import torch, fused_preact
for dev in ('cpu', 'cuda'):
    try:
        torch.ops.fused_preact.bn_stats(torch.randn(2, 4, 3, device=dev))
    except RuntimeError as e:
        print(dev, 'raised', str(e).splitlines()[0])
\""
PROVIDERS=${BENCH_PROVIDERS:-eager,eager_cl,native,triton}
BENCH=($PY -m fused_preact.bench --device cuda --suite "$SUITES" --dtype bfloat16 --providers "$PROVIDERS"
       --cuda-graph --no-progress --out "$OUT/bench")
# Compile the benchmark's Triton kernels (8 processes) while the tests run;
# the timed benchmark starts after both, on a quiet GPU.
echo "=== bench compile in the background (limit 200s)" | tee -a "$LOG"
timeout --kill-after=10 200 "${BENCH[@]}" --warm-workers 8 --warm-only > "$OUT/bench_compile.log" 2>&1 &
WARM=$!
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 12")
step tests 240 env FUSED_PREACT_TRITON_AUTOTUNE=0 FUSED_PREACT_EXPECT_CUDA=1 $PY -m pytest -v --tb=short -rfEs $XDIST \
  -p no:cacheprovider -p no:benchmark --junitxml="$OUT/tests.xml" tests/test_native_ops.py tests/test_triton.py \
  tests/test_package.py tests/test_integration.py "tests/test_timm.py::test_timm_blocks_on_the_triton_backend" \
  ${TEST_ARGS:-}
wait $WARM
echo "=== bench compile: exit $? at +$(($(date +%s) - T0))s" | tee -a "$LOG"
cat "$OUT/bench_compile.log" >> "$LOG"
rm -f "$OUT/bench_compile.log"
step bench 150 "${BENCH[@]}" --warm-workers 0
# Kernel-by-kernel device time per unit step (profiler), beside the floors.
step kernel_times 150 $PY benchmarks/kernel_times.py --out "$OUT/kernel_times"
tail -n 60 "$OUT/bench/report.md" 2>/dev/null
head -n 40 "$OUT/kernel_times/kernel_times.md" 2>/dev/null
grep -E "passed|failed|error" "$LOG" | tail -n 5
echo "gpu_check finished in $(($(date +%s) - T0))s; logs in $OUT"
