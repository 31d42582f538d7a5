#!/usr/bin/env bash
# Issue 4's measurement in one short GPU call (about 7-8 minutes on an H200; the
# required steps' limits add up to 680 s but ran in 270 s in session 11; the
# side-by-side ones run while they fit before DEADLINE, 480 s by default):
# GPU tests of the recently changed Triton code (TESTS, test function
# names; first configs only, FUSED_PREACT_TRITON_AUTOTUNE=0: each form
# is forced by its flag, and with autotuning every test shape compiled every
# candidate in process, which cut session 5's run 3 after 17 tests; the
# autotuner's trials ran there, and every candidate compiles in CI), then
# every ResNet-164 (batch 128) and ResNet-v2-50 (batch 64) unit's training
# step, eager PyTorch channels_last vs Triton, bf16 autocast, autotuning on:
# device time (the profiler's kernel durations, benchmarks/kernel_times.py)
# and wall time per step; with GRAPHS=1, CUDA-graph replays of the ResNet-164
# units (a separate process: a failed capture stops nothing else; measured in
# session 5's runs 1 and 3). Everything lands
# in OUTDIR/gpu_units.tar.gz (one file: the device tool brings back at most
# 8) beside the log. No C++ build: the Triton path does not need it.
#   bash benchmarks/gpu_units.sh OUTDIR
set -u -o pipefail
OUT=$(realpath -m "${1:?usage: gpu_units.sh OUTDIR}")
mkdir -p "$OUT"
LOG=$OUT/gpu_units.log
# shellcheck source=benchmarks/gpu_common.sh
. "$(dirname "$0")/gpu_common.sh"
# TESTS=none skips the GPU tests; MODELS picks the unit sets (both by default);
# TRIAL_SIDE_BY_SIDE=1 adds ResNet-164's table with the autotuner's trials timed
# one launch at a time (FUSED_PREACT_GRAPH_TRIALS=0, the form before session 8).
MODELS=${MODELS:-"resnet164 resnetv2_50"}
# TESTS: test functions of tests/test_triton.py, passed as node ids (not a -k
# expression: on the device pytest's -k "tma" also matched a parent folder's
# name and ran the whole file, session 11); the TMA forms' own check is
# benchmarks/gpu_tma_check.sh. Newest first (sessions 15, 14, 13, 12, then
# session 11's fixed tests): 151 tests, ~3.6 s each a worker beside the
# background compile (session 11: 56 in 200 s with 4 workers; session 15's
# library-route tests compile only small kernels), so a cut leaves the oldest.
TESTS=${TESTS:-"test_gemms_through_the_library_route test_library_route_with_a_weight_of_another_dtype_and_layout
  test_relu_backward_partials_against_torch test_emitted_statistics_are_those_of_the_output
  test_library_route_timed_once_a_shape test_non_contiguous_input
  test_gemms_held_to_two_programs_an_sm test_weight_gradient_one_kernel_row_a_program
  test_weight_gradient_kernel_rows_only_where_they_apply
  test_gemms_copying_taps_through_l1 test_l1_taps_only_where_there_are_taps
  test_gemms_reading_an_activation_pass test_activation_pass_against_the_reference
  test_backward_finalize_in_the_dgrads_last_programs test_batch_counted_by_the_finalize
  test_tails_decline_what_one_program_should_not_sum test_statistics_finalized_in_their_last_programs
  test_tails_agree_over_many_launches test_stride_2_dgrad_in_parity_classes"}
NODES=()
for name in $TESTS; do NODES+=("tests/test_triton.py::$name"); done

step environment 20 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv;
  $PY -c 'import sys, torch, triton; print(sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, torch.cuda.get_device_name())'; nproc"
# Compile every autotuning candidate of the units' Triton kernels in 10
# processes (Triton's on-disk cache) while the GPU tests run on 6.
BENCH=($PY -m fused_preact.bench --device cuda --suite units --units "${MODELS// /,}" --dtype bfloat16
       --providers eager_cl,triton --no-progress)
# (Session 8's run 2 compiled for 137 s; the small-grid candidates added after it, and session 10's
# TMA candidates, 2-4 more per stride-1 GEMM shape, compile more: if this limit cuts the compile,
# the kernel_times steps compile the rest themselves and may run out of time: TAILS_SIDE_BY_SIDE=0
# then gives them 60 s.)
echo "=== compile in the background (limit 300s, at +$(($(date +%s) - T0))s)" | tee -a "$LOG"
timeout --kill-after=5 300 "${BENCH[@]}" --out "$OUT/warm" --warm-workers 10 --warm-only > "$OUT/warm.log" 2>&1 &
WARM=$!
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 6")  # (16 cores: 10 compiling, 6 testing)
[ "$TESTS" = none ] || STEP_SIGNAL=INT step triton_tests 240 env FUSED_PREACT_TRITON_AUTOTUNE=0 $PY -m pytest -q -rfE $XDIST \
  -p no:cacheprovider -p no:benchmark "${NODES[@]}"
wait $WARM
echo "=== compile: exit $? at +$(($(date +%s) - T0))s" | tee -a "$LOG"
cat "$OUT/warm.log" >> "$LOG"; rm -rf "$OUT"/warm*
# The side-by-side steps' kernels are other specializations (ACT_PASS's
# and TAP_ROWS's candidates, L1_TAPS's constexpr): ~60-110 compiles each,
# minutes one at a time in the measuring process, so compiled here first,
# both sets at once in 7 processes each, before anything is timed.
side_warm() {  # side_warm NAME VARIABLE=1 [VARIABLE=1 ...]
  timeout --kill-after=5 150 env "${@:2}" "${BENCH[@]}" --units resnetv2_50 --providers triton \
    --out "$OUT/warm_$1" --warm-workers 7 --warm-only > "$OUT/warm_$1.log" 2>&1
  echo "=== side-by-side compile $1: exit $? at +$(($(date +%s) - T0))s" | tee -a "$LOG"
}
# (Off by default since session 15: the side-by-side compiles took up to
# 150 s before the first table, and with them the tables and the library
# route's side by side did not fit the device call.)
ACT_SIDE_BY_SIDE=${ACT_SIDE_BY_SIDE:-0} L1_SIDE_BY_SIDE=${L1_SIDE_BY_SIDE:-0}
if [ "$ACT_SIDE_BY_SIDE" = 1 ] || [ "$L1_SIDE_BY_SIDE" = 1 ]; then
  echo "=== side-by-side compile (limit 150s, at +$(($(date +%s) - T0))s)" | tee -a "$LOG"
  [ "$ACT_SIDE_BY_SIDE" = 1 ] && side_warm act FUSED_PREACT_ACT_PASS=1 FUSED_PREACT_WGRAD_TAP_ROWS=1 &
  [ "$L1_SIDE_BY_SIDE" = 1 ] && side_warm l1 FUSED_PREACT_L1_TAPS=1 &
  wait
fi
cat "$OUT"/warm_*.log >> "$LOG" 2>/dev/null; rm -rf "$OUT"/warm*
for model in $MODELS; do  # one process each: a killed one loses only its own table
  step "kernel_times_$model" "$([ "$model" = resnetv2_50 ] && echo 150 || echo 60)" $PY benchmarks/kernel_times.py \
    --providers eager_cl,triton --units "$model" --steps 10 --out "$OUT/kernel_times_$model"
done
# Optional side-by-side steps run only while they fit before DEADLINE seconds
# (default 480: the device call's limit less a margin for the archive).
fits() { [ $(($(date +%s) - T0 + $1)) -le "${DEADLINE:-480}" ]; }
# Side by side (LIBRARY_SIDE_BY_SIDE=1, the default): each GEMM of each
# unit timed against PyTorch's convolution with the unit's other work in
# Triton passes (FUSED_PREACT_LIBRARY_GEMM=1, session 15; off by default
# until its GPU tests, in TESTS above, pass), ResNet-v2-50 first. Its own
# kernels are small (compiled in seconds); the Triton GEMMs it is timed
# against were compiled above. The route trials are in the json's
# "autotuned" list ("forward route" ...).
for model in $([ "${LIBRARY_SIDE_BY_SIDE:-1}" = 1 ] && echo resnetv2_50 resnet164); do
  case " $MODELS " in *" $model "*) ;; *) continue ;; esac  # (only the MODELS asked for)
  limit=$([ "$model" = resnetv2_50 ] && echo 120 || echo 60)
  fits "$limit" && step "kernel_times_${model}_library" "$limit" env FUSED_PREACT_LIBRARY_GEMM=1 \
    $PY benchmarks/kernel_times.py --providers eager_cl,triton --units "$model" --steps 10 \
    --out "$OUT/kernel_times_${model}_library"
done
# Side by side (TMA_SIDE_BY_SIDE=1): ResNet-v2-50 with the TMA-descriptor
# candidates offered (off by default since their GPU tests failed in session
# 11; session 11's run timed them, RESULTS.md). Run it once
# benchmarks/gpu_tma_check.sh passes.
[ "${TMA_SIDE_BY_SIDE:-0}" = 1 ] && fits 90 && step kernel_times_resnetv2_50_tma 90 \
  env FUSED_PREACT_FWD_TMA=1 FUSED_PREACT_DGRAD_TMA=1 FUSED_PREACT_WGRAD_TMA=1 \
  $PY benchmarks/kernel_times.py --providers triton --units resnetv2_50 --steps 10 \
  --out "$OUT/kernel_times_resnetv2_50_tma"
# Side by side (ACT_SIDE_BY_SIDE=1): ResNet-v2-50 with the
# activation-pass candidates of its forwards and weight gradients offered
# (session 12), and the kernel-row weight gradients (TAP_ROWS, session 14;
# both off by default until their GPU tests, in TESTS above, pass; the
# autotuner's tables time them against the fused forms and each other).
[ "$ACT_SIDE_BY_SIDE" = 1 ] && fits 90 && step kernel_times_resnetv2_50_act_pass 90 \
  env FUSED_PREACT_ACT_PASS=1 FUSED_PREACT_WGRAD_TAP_ROWS=1 $PY benchmarks/kernel_times.py --providers triton --units resnetv2_50 --steps 10 \
  --out "$OUT/kernel_times_resnetv2_50_act_pass"
# Side by side (L1_SIDE_BY_SIDE=1): ResNet-v2-50 with the 3x3
# GEMMs' tap tiles copied through L1 (session 13; off by default until timed).
[ "$L1_SIDE_BY_SIDE" = 1 ] && fits 90 && step kernel_times_resnetv2_50_l1_taps 90 \
  env FUSED_PREACT_L1_TAPS=1 $PY benchmarks/kernel_times.py --providers triton --units resnetv2_50 --steps 10 \
  --out "$OUT/kernel_times_resnetv2_50_l1_taps"
# Side by side: ResNet-164 with the finalize kernels instead of the
# last-program tails (session 9; the separate BN finalizes and the count).
[ "${TAILS_SIDE_BY_SIDE:-1}" = 1 ] && fits 60 && step kernel_times_no_tails 60 env FUSED_PREACT_FINALIZE_TAIL=0 \
  $PY benchmarks/kernel_times.py --providers eager_cl,triton --units resnet164 --steps 10 \
  --out "$OUT/kernel_times_no_tails"
[ "${TRIAL_SIDE_BY_SIDE:-0}" = 1 ] && step kernel_times_single_launch_trials 60 env FUSED_PREACT_GRAPH_TRIALS=0 \
  $PY benchmarks/kernel_times.py --providers eager_cl,triton --units resnet164 --steps 10 \
  --out "$OUT/kernel_times_single_launch_trials"
# (Side-by-side steps of earlier sessions, answered and recorded in
# benchmarks/RESULTS.md: the stride-2 dgrad with all taps,
# FUSED_PREACT_DGRAD_PARITY=0; fp32 1x1 weights uncast,
# FUSED_PREACT_CAST_WEIGHT_REDUCTION=0; 64-bit offsets,
# FUSED_PREACT_WIDE_INDEX=1; host time, benchmarks/host_overhead.py --cuda.
# Each is one kernel_times.py call with that variable set.)
[ "${GRAPHS:-0}" = 1 ] && step graphs 50 "${BENCH[@]}" --units resnet164 --repeats 20 --warmup 3 \
  --cuda-graph --warm-workers 0 --out "$OUT/bench"
grep -E "passed|failed|=== " "$LOG" | tail -n 12
head -n 22 "$OUT"/kernel_times_*/kernel_times.md 2>/dev/null
sed -n '/## Units/,/### The same/p' "$OUT/bench/report.md" 2>/dev/null | head -n 20
tar -czf /tmp/gpu_units.tar.gz -C "$OUT" --exclude='*.png' . 2>> "$LOG" && \
  find "$OUT" -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} + && mv /tmp/gpu_units.tar.gz "$OUT/"
echo "gpu_units finished in $(($(date +%s) - T0))s"
