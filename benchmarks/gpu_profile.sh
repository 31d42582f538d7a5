#!/usr/bin/env bash
# Hardware counters (Nsight Compute) of one training step of chosen units'
# kernels, in one GPU call (~1 minute per unit): the kernels kernel_times.py
# found far from their floors. One ncu process per unit, so each table holds
# that unit's kernels only; a summary table per unit and the raw CSVs land in
# OUTDIR/gpu_profile.tar.gz beside the log.
#   bash benchmarks/gpu_profile.sh OUTDIR [model:unit ...]
# Default units: the ResNet-v2-50 1x1a of stage 1 (its dgrad at 3x its memory
# floor), its 3x3 of stage 3 (wgrad 8.5x) and ResNet-164's first 3x3.
# STALLS=1 (default) adds a second ncu pass per unit for the stall reasons
# (what the warps wait on; session 8 found the large GEMMs latency-bound,
# 68% of cycles without an eligible warp, but not on what): the raw metrics
# smsp__average_warps_issue_stalled_*_per_issue_active, summarised by
# profile_units.py --stalls (~20 s more per unit; its own step, so a metric
# name this ncu lacks costs only that table).
set -u -o pipefail
OUT=$(realpath -m "${1:?usage: gpu_profile.sh OUTDIR [model:unit ...]}")
shift
UNITS=("$@")
[ ${#UNITS[@]} -gt 0 ] || UNITS=(resnetv2_50:s1.1x1a resnetv2_50:s3.3x3 resnet164:s1.3x3)
mkdir -p "$OUT/profile"
LOG=$OUT/gpu_profile.log
# shellcheck source=benchmarks/gpu_common.sh
. "$(dirname "$0")/gpu_common.sh"
NCU=${NCU:-ncu}
step environment 20 bash -c "nvidia-smi --query-gpu=name,driver_version --format=csv; $NCU --version | tail -n 1"
for unit in "${UNITS[@]}"; do
  name=${unit//[:.\/]/_}
  # --clock-control none: measure the card as it runs (and leave its clocks alone).
  step "ncu $unit" 150 bash -c "$NCU --profile-from-start off --target-processes all --clock-control none \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis \
    --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --csv --page details \
    $PY benchmarks/profile_units.py --units $unit > '$OUT/profile/$name.csv'"
  $PY benchmarks/profile_units.py --summarize "$OUT/profile/$name.csv" --out "$OUT/profile/$name.md" \
    > /dev/null 2>> "$LOG"
  echo "## $unit" | tee -a "$LOG"; cat "$OUT/profile/$name.md" 2>/dev/null | tee -a "$LOG"
  [ "${STALLS:-1}" = 1 ] || continue
  step "ncu stalls $unit" 150 bash -c "$NCU --profile-from-start off --target-processes all --clock-control none \
    --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' --csv --page raw \
    $PY benchmarks/profile_units.py --units $unit > '$OUT/profile/${name}_stalls.csv'"
  $PY benchmarks/profile_units.py --stalls "$OUT/profile/${name}_stalls.csv" --out "$OUT/profile/${name}_stalls.md" \
    > /dev/null 2>> "$LOG"
  echo "### stall reasons: $unit" | tee -a "$LOG"; cat "$OUT/profile/${name}_stalls.md" 2>/dev/null | tee -a "$LOG"
done
tar -czf /tmp/gpu_profile.tar.gz -C "$OUT" profile && rm -rf "$OUT/profile" && mv /tmp/gpu_profile.tar.gz "$OUT/"
echo "gpu_profile finished in $(($(date +%s) - T0))s"
