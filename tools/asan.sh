#!/usr/bin/env bash
# The test suite against a build of pyengine with AddressSanitizer and UndefinedBehaviorSanitizer:
#
#   tools/asan.sh [pytest arguments]        (make asan)
#
# 1. copies the working tree (tracked and untracked, not ignored, files) to build/asan/tree, so the
#    normal in-place build (pyengine/_C*.so) is left alone; the copy keeps its own build/ between
#    runs, and file times are kept, so ninja recompiles only what changed;
# 2. builds it there, CPU only, with PYENGINE_SANITIZE=address,undefined (setup.py: -O1 -g,
#    -fno-omit-frame-pointer, -fno-sanitize-recover: a UBSan finding aborts the run);
# 3. runs pytest in the copy, so `import pyengine` there (and in the Python subprocesses tests
#    start) loads the instrumented _C; it checks that first. Python is not instrumented: the ASan
#    runtime is preloaded, together with libstdc++ (ASan intercepts __cxa_throw, and without
#    libstdc++ loaded first every C++ exception thrown across the extension's boundary aborts).
#    Sanitizer reports go to build/asan/reports/; any report fails the run.
#
# Measured on the shared 2-core machine (2026-12-02): a fresh build 13.6 min at MAX_JOBS=1 (load
# ~7), a rebuild with no C++ change 5 s; the suite 7.8 min at load ~3, 16 min at load ~7 (3-4x
# its normal time). The fuzz lane alone under ASan, longer:
#   PYENGINE_RANDOM_SEED=1 PYENGINE_FUZZ_SECONDS=20 tools/asan.sh -s tests/test_fuzz.py
#
#   tools/asan.sh --cuda-emu [pytest arguments]        (make cuda-emu-asan)
# instead runs the CUDA emulation lane (tests/test_emulated_cuda.py, tests/test_cuda_emu.py) with
# csrc/cuda's kernels and glue and the emulator built with both sanitizers
# (PYENGINE_EMU_SANITIZE, tests/cuda_emu/lane.py; objects in build/cuda-emu-<hash>/), in this
# tree, against the normal build of pyengine's CPU kernels: steps 1 and 2 are skipped.
#
# Knobs: MAX_JOBS (default 1), PYTHON, ASAN_OPTIONS / UBSAN_OPTIONS (replace the defaults below).
# Logs: build/asan/build.log, build/asan/tests.log. Exit status: pytest's (or the step that failed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=build/asan
TREE=$OUT/tree
mkdir -p "$TREE"
CUDA_EMU=0
if [ "${1:-}" = "--cuda-emu" ]; then
  CUDA_EMU=1
  shift
  OUT=build/cuda-emu-asan
  TREE=.
  mkdir -p "$OUT"
fi

if [ "$CUDA_EMU" = 0 ]; then

# ---- 1. the copy ---------------------------------------------------------------------------------
# everything but the copy's own build/ (compiled objects) goes, then comes back from the tree
find "$TREE" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -T - -cf - | tar -xf - -C "$TREE"

# ---- 2. the build --------------------------------------------------------------------------------
echo "[asan] building in $TREE (MAX_JOBS=${MAX_JOBS:-1}) -> $OUT/build.log"
start=$(date +%s)
if ! (cd "$TREE" && PYENGINE_CUDA=0 PYENGINE_SANITIZE=address,undefined MAX_JOBS=${MAX_JOBS:-1} \
      "$PY" setup.py build_ext --inplace) > "$OUT/build.log" 2>&1; then
  tail -30 "$OUT/build.log"
  echo "[asan] build failed: $OUT/build.log"
  exit 2
fi
echo "[asan] built in $(( $(date +%s) - start )) s"
fi

# ---- 3. the suite --------------------------------------------------------------------------------
asan_rt=$(gcc -print-file-name=libasan.so)
cxx_rt=$(gcc -print-file-name=libstdc++.so)
for lib in "$asan_rt" "$cxx_rt"; do
  [ -e "$lib" ] || { echo "[asan] $lib not found (gcc -print-file-name)"; exit 2; }
done
export LD_PRELOAD="$asan_rt $cxx_rt${LD_PRELOAD:+ $LD_PRELOAD}"
# detect_leaks=0: CPython and torch keep allocations alive until exit by design (LSan would list
#   thousands); allocator_may_return_null=1: the tests that ask for absurd sizes get torch's
#   out-of-memory error, as without ASan, instead of an ASan abort.
# log_path: pytest captures stderr in a temporary file, where a report printed by a process that
#   the sanitizer then stops would be lost; the reports go to $OUT/reports/ instead.
reports=$PWD/$OUT/reports
rm -rf "$reports" && mkdir -p "$reports"
asan_defaults=detect_leaks=0:allocator_may_return_null=1:symbolize=1:log_path=$reports/asan
export ASAN_OPTIONS=${ASAN_OPTIONS:-$asan_defaults}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1:log_path=$reports/ubsan}

if [ "$CUDA_EMU" = 1 ]; then
  export PYENGINE_EMU_SANITIZE=address,undefined
  set -- tests/test_emulated_cuda.py tests/test_cuda_emu.py "$@"
else
  loaded=$(cd "$TREE" && "$PY" -c 'import pyengine; print(pyengine._C.__file__)')
  case "$loaded" in
    "$PWD/$TREE"/*) ;;
    *) echo "[asan] expected the instrumented build under $TREE, but pyengine loaded $loaded"
       exit 2 ;;
  esac
  if ! readelf -d "$loaded" | grep -q 'libasan'; then
    echo "[asan] $loaded is not linked against libasan: not a sanitizer build"; exit 2
  fi
  echo "[asan] pyengine._C: $loaded"
fi
echo "[asan] pytest in $TREE -> $OUT/tests.log"
start=$(date +%s)
set +e
# test_cuda_build.py runs nvcc over the CUDA sources (no pyengine code runs): nvcc's tools crash
# with the ASan runtime preloaded, and the normal suite runs that check anyway.
(cd "$TREE" && "$PY" -m pytest -q -p no:cacheprovider --ignore=tests/test_cuda_build.py "$@") 2>&1 \
  | tee "$OUT/tests.log" | tail -40
rc=${PIPESTATUS[0]}
set -e
echo "[asan] tests took $(( $(date +%s) - start )) s, exit status $rc"
if [ -n "$(ls -A "$reports")" ]; then
  echo "[asan] sanitizer reports in $OUT/reports:"
  for f in "$reports"/*; do echo "==== $f"; head -60 "$f"; done
  [ "$rc" -eq 0 ] && rc=1
else
  echo "[asan] no sanitizer reports"
fi
exit "$rc"
