#!/usr/bin/env bash
# One command for a fresh GPU machine (torch with CUDA, nvcc and pytest installed; no network):
#
#   tools/gpu_check.sh
#
# 1. builds pyengine in place with its CUDA kernels (PYENGINE_CUDA=1, MAX_JOBS = all cores);
# 2. runs the whole test suite (slow tests included: tensors past 2^31 elements);
# 3. runs compute-sanitizer --tool memcheck over the quick CUDA subset (pytest -k cuda, not slow,
#    not the build checks nor the device-assert tests, which fail kernels on purpose), with torch's caching allocator
#    off (PYTORCH_NO_CUDA_MEMORY_CACHING=1) so every out-of-bounds access hits real bounds;
# 4. prints a short summary last.
#
# Logs go to ${OUT:-./gpu_check_out}: env.txt, build.log, ptxas.txt, tests.log, junit.xml,
# sanitizer.log, summary.txt. Exit status 0 only when all three steps are clean.
# Knobs: MAX_JOBS, TORCH_CUDA_ARCH_LIST (default: this GPU's), SANITIZER_TIMEOUT (s, default 1800),
# PYTEST_ARGS (extra arguments for the full run).
set -u
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-./gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python}

export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$($PY -c 'import torch; c = torch.cuda.get_device_capability(); print(f"{c[0]}.{c[1]}")' 2>/dev/null || echo "9.0")
  export TORCH_CUDA_ARCH_LIST
fi

# ---- environment ------------------------------------------------------------------------------
{
  date -u
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  command -v nvcc >/dev/null && nvcc --version
  $PY -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
  echo "MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
} > "$OUT/env.txt" 2>&1
device=$($PY -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")' 2>/dev/null)

# ---- 1. build -----------------------------------------------------------------------------------
echo "[gpu_check] building (MAX_JOBS=$MAX_JOBS, arch $TORCH_CUDA_ARCH_LIST) -> $OUT/build.log"
start=$(date +%s)
PYENGINE_CUDA=1 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
build_rc=$?
build_s=$(( $(date +%s) - start ))
if [ $build_rc -eq 0 ]; then
  $PY -c 'import pyengine, sys; sys.exit(0 if pyengine._C.built_with_cuda else 1)' >> "$OUT/build.log" 2>&1 \
    || { build_rc=3; echo "built, but pyengine._C has no CUDA kernels" >> "$OUT/build.log"; }
fi

# ---- 2. the whole test suite --------------------------------------------------------------------
tests_summary="not run (build failed)"
tests_rc=1
if [ $build_rc -eq 0 ]; then
  echo "[gpu_check] test suite -> $OUT/tests.log"
  PYENGINE_PTXAS_REPORT="$OUT/ptxas.txt" $PY -m pytest -q -rfEs -p no:cacheprovider \
    --junitxml="$OUT/junit.xml" ${PYTEST_ARGS:-} > "$OUT/tests.log" 2>&1
  tests_rc=$?
  tests_summary=$($PY - "$OUT/junit.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception as exc:
    print(f"no junit report ({exc})"); sys.exit()
suites = [root] if root.tag == "testsuite" else list(root)
n = lambda key: sum(int(s.get(key, 0)) for s in suites)
total, failed, errors, skipped = n("tests"), n("failures"), n("errors"), n("skipped")
print(f"{total - failed - errors - skipped} passed, {failed} failed, {errors} errors, "
      f"{skipped} skipped")
EOF
)
fi

# ---- 3. compute-sanitizer memcheck over the quick CUDA subset ----------------------------------
san_summary="not run"
san_errors=-1
if [ $build_rc -ne 0 ]; then
  san_summary="not run (build failed)"
elif ! command -v compute-sanitizer >/dev/null; then
  san_summary="not run (compute-sanitizer not found)"
else
  echo "[gpu_check] compute-sanitizer memcheck -> $OUT/sanitizer.log"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${SANITIZER_TIMEOUT:-1800}" \
    compute-sanitizer --tool memcheck --target-processes all --print-limit 50 \
    $PY -m pytest -q -p no:cacheprovider -m "not slow" -k "cuda and not cuda_build and not device_assert" \
    > "$OUT/sanitizer.log" 2>&1
  san_rc=$?
  san_errors=$(grep -E "ERROR SUMMARY: [0-9]+ error" "$OUT/sanitizer.log" \
               | sed -E 's/.*ERROR SUMMARY: ([0-9]+) error.*/\1/' | awk '{s += $1} END {print s + 0}')
  san_tests=$(grep -E "[0-9]+ (passed|failed)" "$OUT/sanitizer.log" | tail -1)
  if [ $san_rc -eq 124 ]; then
    san_summary="$san_errors errors before the ${SANITIZER_TIMEOUT:-1800} s time limit (timed out)"
    [ "$san_errors" -eq 0 ] && san_errors=-1
  else
    san_summary="$san_errors errors (pytest under memcheck: ${san_tests:-no summary}, rc $san_rc)"
  fi
fi

# ---- 4. summary ---------------------------------------------------------------------------------
build_summary=$([ $build_rc -eq 0 ] && echo "ok (${build_s} s)" || echo "FAILED (rc $build_rc)")
{
  echo "==== pyengine GPU check: $device ===="
  echo "build:     $build_summary   log: $OUT/build.log"
  echo "tests:     $tests_summary   log: $OUT/tests.log"
  echo "sanitizer: $san_summary   log: $OUT/sanitizer.log"
  [ -f "$OUT/ptxas.txt" ] && echo "ptxas:     registers / spills per kernel in $OUT/ptxas.txt"
} | tee "$OUT/summary.txt"

[ $build_rc -eq 0 ] && [ $tests_rc -eq 0 ] && [ "$san_errors" -eq 0 ] && exit 0
exit 1
