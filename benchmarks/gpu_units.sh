#!/usr/bin/env bash
# Issue 4's measurement in one short GPU call (about 5 minutes on an H100):
# the Triton path's correctness on the GPU for the recently changed kernels,
# then every ResNet-164 (batch 128) and ResNet-v2-50 (batch 64) unit's
# training step, eager PyTorch channels_last vs Triton, bf16 autocast,
# autotuning on: device time (the profiler's kernel durations,
# benchmarks/kernel_times.py) and wall time per step; last, CUDA-graph
# replays of the ResNet-164 units (a separate process: a failed capture stops
# nothing else). With BASE (a commit), the ResNet-164 measurements are made
# for that commit too, on the same machine in the same call (a git worktree),
# for a before/after comparison. Everything lands in OUTDIR/gpu_units.tar.gz
# (one file: the device tool brings back at most 8) beside the log.
# No C++ build: the Triton path does not need the compiled extension.
#   bash benchmarks/gpu_units.sh OUTDIR [BASE]
set -u -o pipefail
OUT=$(realpath -m "${1:?usage: gpu_units.sh OUTDIR [BASE]}")
BASE=${2:-}
mkdir -p "$OUT"
LOG=$OUT/gpu_units.log
# shellcheck source=benchmarks/gpu_common.sh
. "$(dirname "$0")/gpu_common.sh"

step environment 20 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv;
  $PY -c 'import sys, torch, triton; print(sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, torch.cuda.get_device_name())';
  git log -1 --format='commit %H %s' 2>/dev/null || true; nproc"
# Compile every autotuning candidate of the units' Triton kernels in 10
# processes (Triton's on-disk cache) while the GPU tests run on 4.
BENCH=($PY -m fused_preact.bench --device cuda --suite units --units resnet164,resnetv2_50 --dtype bfloat16
       --providers eager_cl,triton --no-progress)
echo "=== compile in the background (limit 230s, at +$(($(date +%s) - T0))s)" | tee -a "$LOG"
timeout --kill-after=5 230 "${BENCH[@]}" --out "$OUT/warm" --warm-workers 10 --warm-only > "$OUT/warm.log" 2>&1 &
WARM=$!
BASE_DIR=/tmp/fused_preact_base
if [ -n "$BASE" ]; then
  git worktree add --detach "$BASE_DIR" "$BASE" >> "$LOG" 2>&1
  # The baseline's kernels, compiled alongside (ResNet-164 units only).
  (cd "$BASE_DIR" && PYTHONPATH=$BASE_DIR timeout --kill-after=5 230 $PY -m fused_preact.bench --device cuda \
     --suite units --units resnet164 --dtype bfloat16 --providers triton --no-progress --out "$OUT/warm_base" \
     --warm-workers 6 --warm-only) > "$OUT/warm_base.log" 2>&1 &
  WARM_BASE=$!
fi
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 4")
step triton_tests 140 env FUSED_PREACT_TRITON_AUTOTUNE=0 $PY -m pytest -q -rfE $XDIST -p no:cacheprovider \
  -p no:benchmark tests/test_triton.py tests/test_integration.py \
  -k "repeated or reduction_loops or weights_layout or float32 or emitted or autocast or column_tiles or packed_or or deterministic"
wait $WARM
echo "=== compile: exit $? at +$(($(date +%s) - T0))s" | tee -a "$LOG"
if [ -n "$BASE" ]; then
  wait $WARM_BASE
  echo "=== compile of $BASE: exit $? at +$(($(date +%s) - T0))s" | tee -a "$LOG"
  cat "$OUT/warm_base.log" >> "$LOG"
fi
cat "$OUT/warm.log" >> "$LOG"; rm -rf "$OUT"/warm*
for set in resnet164:120 resnetv2_50:140; do  # one process each: a killed one loses only its own table
  step "kernel_times_${set%:*}" "${set#*:}" $PY benchmarks/kernel_times.py --providers eager_cl,triton \
    --units "${set%:*}" --steps 10 --out "$OUT/kernel_times_${set%:*}"
done
GRAPHS=(--units resnet164 --repeats 20 --warmup 3 --cuda-graph --warm-workers 0)
step graphs 70 env FUSED_PREACT_CAPTURE_MODE=thread_local "${BENCH[@]}" "${GRAPHS[@]}" --out "$OUT/bench"
if [ -n "$BASE" ]; then
  cd "$BASE_DIR"
  step "kernel_times_resnet164 at $BASE" 120 env PYTHONPATH="$BASE_DIR" $PY benchmarks/kernel_times.py \
    --providers eager_cl,triton --units resnet164 --steps 10 --out "$OUT/base_kernel_times_resnet164"
  step "graphs at $BASE" 70 env PYTHONPATH="$BASE_DIR" FUSED_PREACT_CAPTURE_MODE=thread_local "${BENCH[@]}" \
    "${GRAPHS[@]}" --out "$OUT/base_bench"
  cd - > /dev/null
fi
grep -E "passed|failed|=== " "$LOG" | tail -n 12
head -n 20 "$OUT"/kernel_times_resnet164/kernel_times.md "$OUT"/kernel_times_resnetv2_50/kernel_times.md 2>/dev/null
sed -n '/## Units/,/### The same/p' "$OUT/bench/report.md" 2>/dev/null | head -n 20
tar -czf /tmp/gpu_units.tar.gz -C "$OUT" --exclude='*.png' . 2>> "$LOG" && \
  find "$OUT" -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} + && mv /tmp/gpu_units.tar.gz "$OUT/"
echo "gpu_units finished in $(($(date +%s) - T0))s"
