# Shared by gpu_check.sh and gpu_quick.sh (sourced, not run): the repository
# root as working directory, Python settings, and step(), which runs one
# command under a time limit, appends its output to $LOG and never aborts the
# calling script (each step's exit status is in the log).
# Expects OUT (the output folder) and LOG (the log file) to be set.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
T0=$(date +%s)

# STEP_SIGNAL=INT (for pytest) stops a step at its limit the way Ctrl-C
# does, so that pytest still prints which tests failed (session 11: the
# default TERM killed a test run before its report).
step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "=== $name (limit ${limit}s, at +$((start - T0))s): $*" | tee -a "$LOG"
  timeout -s "${STEP_SIGNAL:-TERM}" --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  echo "=== $name: exit $rc after $(($(date +%s) - start))s" | tee -a "$LOG"
}

# The system compiler: built with the image's /opt/gcc g++ (its CXX), every
# C++ exception from the extension (a TORCH_CHECK on bad input) crashed the
# process with a segfault on the H200 image (2026-11-27).
BUILD_ENV=(CC="${CC_FOR_TORCH:-gcc}" CXX="${CXX_FOR_TORCH:-g++}" LDSHARED="${CXX_FOR_TORCH:-g++} -shared"
           MAX_JOBS="$(nproc)" TORCH_CUDA_ARCH_LIST=9.0 FORCE_CUDA=1)
