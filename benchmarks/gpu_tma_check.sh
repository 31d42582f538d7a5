#!/usr/bin/env bash
# Why the TMA-descriptor forms of the GEMMs failed their GPU tests (session
# 11, H200: most of test_gemms_through_tma_descriptors failed; the report of
# which check was lost to the run's time limit). One short GPU call, about
# 3 minutes: benchmarks/tma_diagnose.py (TMA form against pointer form, one
# process per kernel: a CUDA error ends only its own), then the TMA tests by
# node id (not -k: on the device, pytest's -k "tma" also matched a parent
# folder's name and selected the whole file), stopped with SIGINT before the
# limit so that pytest still prints its failures.
#   bash benchmarks/gpu_tma_check.sh OUTDIR
set -u -o pipefail
OUT=$(realpath -m "${1:?usage: gpu_tma_check.sh OUTDIR}")
mkdir -p "$OUT"
LOG=$OUT/gpu_tma_check.log
# shellcheck source=benchmarks/gpu_common.sh
. "$(dirname "$0")/gpu_common.sh"
export FUSED_PREACT_TRITON_AUTOTUNE=0
step environment 20 $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
for kernel in fwd dgrad wgrad; do
  step "diagnose_$kernel" 60 $PY benchmarks/tma_diagnose.py --kernels "$kernel" --out "$OUT/tma_diagnose.jsonl"
done
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
STEP_SIGNAL=INT step tma_tests 120 $PY -m pytest -q -rfE --tb=short $XDIST -p no:cacheprovider -p no:benchmark \
  --junitxml="$OUT/tma_tests.xml" \
  tests/test_triton.py::test_gemms_through_tma_descriptors \
  tests/test_triton.py::test_forward_tma_only_where_descriptors_can_read \
  tests/test_triton.py::test_gradcheck_float64_through_tma_descriptors
cat "$OUT/tma_diagnose.jsonl" 2>/dev/null | cut -c1-400
grep -E "^(FAILED|ERROR)|passed|failed|^E  " "$LOG" | head -n 60
echo "gpu_tma_check finished in $(($(date +%s) - T0))s"
