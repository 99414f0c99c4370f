#!/usr/bin/env bash
# `make gpu-check`: one command for a fresh GPU machine (torch with CUDA, nvcc, pytest and
# compute-sanitizer installed; no network needed), sized for a short lease: at most
# 500 s in all (each step time-boxed with `timeout`, budget below), usually less.
#
#   tools/gpu_check.sh              on the GPU machine
#   tools/gpu_check.sh --rehearse   on any machine: every step's commands in a form that needs no
#                                   GPU (CPU-only build, the pytest selections collected and
#                                   counted, the benchmark's set on the CPU with 3 runs), then the
#                                   same summary; what tests/test_gpu_check.py keeps from rotting
#
# Steps (budget in seconds; CAP_* variables override):
#  0 env        (CAP_ENV 30)    torch and the GPU, nvcc, compute-sanitizer, nvidia-smi -> env.txt
#  1 build      (CAP_BUILD 140) pyengine in place with its CUDA kernels for this GPU's architecture
#                               only (TORCH_CUDA_ARCH_LIST from the device), MAX_JOBS = all cores,
#                               then (CAP_BUILD_CHECK 10) pyengine._C is checked to have them;
#                               beside it, the benchmark's peak kernels (benchmarks/peak.py) into
#                               build/torch_extensions, so the benchmark step does not compile
#  then two lanes at once, each within CAP_LANE (250; the second lane's caps add up to it):
#  2 tests      every test that runs on CUDA (its id says cuda: tests/test_cuda.py, and the cuda
#               case of each device-parametrized test), except `slow` ones (tensors past 2^31
#               elements, long softmax rows: minutes; `python -m pytest -m slow` runs them); the
#               CPU cases and the CUDA emulation lane are CI's. In parallel (pytest-xdist, where
#               installed: up to 12 workers of 2 threads). Stopped with SIGINT at the limit, so
#               pytest still reports what it ran
#  3 graph      (CAP_GRAPH 20) the CUDA-graph tests: a LeNet training step and every operator's
#               forward and backward pass captured and replayed against eager
#               (tests/test_cuda.py); the benchmark's captured LeNet step, SGD
#               update included, against eager, and its op cases' captures (tests/test_gpu_check.py)
#  4 sanitizers compute-sanitizer over a trimmed set of CUDA op tests (SANITIZER_SELECTION: the
#               first two samples of every operator, each operator call they make, forward and
#               backward ops, float32 and float64; the layout cases), torch's caching allocator
#               off so each tensor's bounds are its own: memcheck (CAP_MEMCHECK 75; also the
#               determinism test's larger sizes: multi-block reductions, split-K), racecheck
#               (CAP_RACECHECK 55), synccheck (CAP_SYNCCHECK 40), these two only on pyengine's
#               kernels (--kernel-name kns=pyengine); initcheck (CAP_INITCHECK 60) on every
#               kernel, over the first sample of each operator (INITCHECK_SELECTION): it must
#               see torch's kernels write, or a tensor torch made (a .contiguous() copy, a dtype
#               conversion) reads as uninitialized in pyengine's kernels (first H200 run)
#  5 bench      (CAP_BENCH 70) python -m benchmarks --gpu-check: the LeNet training step at batch
#               256 and 8192, then every op's forward+backward, pyengine / torch eager / both
#               in CUDA graphs, TF32 off, CUDA-event timing; results in
#               benchmarks/results/gpu-<device>/, copied to $OUT/bench-results/
#  6 summary    one line per step (status, seconds, budget), the test counts, the sanitizers'
#               error counts, LeNet's step-time ratios -> summary.txt (tools/gpu_check_summary.py)
#
# Everything goes to $OUT (default ./gpu_check_out). Exit status 0 only when every step is clean.
# Other knobs: PYTHON, MAX_JOBS, TORCH_CUDA_ARCH_LIST (default: this GPU's), PYTEST_ARGS (extra
# arguments for step 2).
set -u
cd "$(dirname "$0")/.." || exit 2

MODE=gpu
case "${1:-}" in
  "") ;;
  --rehearse) MODE=rehearse ;;
  --show-selections) MODE=show ;;  # for tests/test_gpu_check.py
  *) echo "usage: tools/gpu_check.sh [--rehearse | --show-selections]" >&2; exit 2 ;;
esac

# The pytest selections (tests/test_gpu_check.py checks that each selects tests, every operator
# among them). Test ids: test_parity[<op>-<sample index>-dtype<0: float32, 1: float64>].
# The suite leaves out the CUDA emulation lane (tests/test_emulated_cuda.py, test_cuda_emu.py: the
# same kernels on the CPU, a minute or two of single-threaded work that every CI run does anyway).
SUITE_SELECTION=(-m "not slow" -k cuda --ignore=tests/test_emulated_cuda.py
                 --ignore=tests/test_cuda_emu.py --ignore=tests/test_cuda_build.py)
GRAPH_SELECTION=(tests/test_cuda.py tests/test_gpu_check.py -k cuda_graph)
SANITIZER_SELECTION=(tests/test_cuda.py -m "not slow"
                     -k "(test_parity and (-0- or -1-)) or test_layout_parity")
MEMCHECK_SELECTION=(tests/test_cuda.py -m "not slow"
                    -k "(test_parity and (-0- or -1-)) or test_layout_parity or deterministic")
INITCHECK_SELECTION=(tests/test_cuda.py -m "not slow" -k "(test_parity and -0-) or test_layout_parity")

if [ "$MODE" = show ]; then  # a line per selection: its name, then its arguments, tab-separated
  for name in SUITE GRAPH SANITIZER MEMCHECK INITCHECK; do
    declare -n selection=${name}_SELECTION
    (IFS=$'\t'; echo "$name${IFS}${selection[*]}")
  done
  exit 0
fi


OUT=${OUT:-./gpu_check_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
rm -f "$OUT/steps.tsv"
PY=${PYTHON:-$(command -v python3 || command -v python)}
# The CUDA toolkit's tools where a toolkit is installed but not on PATH (torch finds nvcc anyway).
for dir in "${CUDA_HOME:-/usr/local/cuda}/bin" "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer"; do
  [ -d "$dir" ] && PATH=$PATH:$dir
done
export PYTHONUNBUFFERED=1

CAP_ENV=${CAP_ENV:-30}
# A rehearsal's build compiles the CPU kernels with MAX_JOBS=1: minutes, not the GPU's budget.
if [ "$MODE" = gpu ]; then CAP_BUILD=${CAP_BUILD:-140}; else CAP_BUILD=${CAP_BUILD:-900}; fi
CAP_BUILD_CHECK=${CAP_BUILD_CHECK:-10}
CAP_LANE=${CAP_LANE:-250}
CAP_GRAPH=${CAP_GRAPH:-20}
CAP_MEMCHECK=${CAP_MEMCHECK:-75}
CAP_RACECHECK=${CAP_RACECHECK:-55}
CAP_SYNCCHECK=${CAP_SYNCCHECK:-40}
CAP_INITCHECK=${CAP_INITCHECK:-60}
CAP_BENCH=${CAP_BENCH:-70}
BUDGET=$(( CAP_ENV + CAP_BUILD + CAP_BUILD_CHECK + CAP_LANE + CAP_BENCH ))

# step NAME CAP LOG COMMAND...: COMMAND under `timeout` (SIGINT first: pytest then still reports
# what it ran; SIGKILL 15 s later), output to $OUT/LOG, a row in $OUT/steps.tsv.
step() {
  local name=$1 cap=$2 log=$3 start rc
  shift 3
  echo "[gpu_check] $name (at most $cap s) -> $OUT/$log"
  start=$(date +%s)
  timeout -s INT -k 15 "$cap" "$@" > "$OUT/$log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$cap" "$log" \
    >> "$OUT/steps.tsv"
  return $rc
}

# skip NAME CAP REASON: a row for a step that did not run.
skip() {
  echo "[gpu_check] $1 skipped: $3"
  printf '%s\tskip\t0\t%s\t%s\n' "$1" "$2" "$3" >> "$OUT/steps.tsv"
}

PYTEST=("$PY" -m pytest -q -p no:cacheprovider)

echo "[gpu_check] mode $MODE; budget $BUDGET s: env $CAP_ENV + build $CAP_BUILD" \
     "+ check $CAP_BUILD_CHECK + lanes $CAP_LANE (tests | graph $CAP_GRAPH" \
     "+ memcheck $CAP_MEMCHECK + racecheck $CAP_RACECHECK + synccheck $CAP_SYNCCHECK" \
     "+ initcheck $CAP_INITCHECK) + bench $CAP_BENCH; logs in $OUT"
echo "$BUDGET" > "$OUT/budget.txt"

# ---- 0. environment -------------------------------------------------------------------------
# (nproc counts OMP_NUM_THREADS, not cores, when it is set)
CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
if [ "$MODE" = gpu ]; then
  export MAX_JOBS=${MAX_JOBS:-$CORES}
else
  export MAX_JOBS=${MAX_JOBS:-1}  # a rehearsal shares its machine
fi
# torch's view first: the build needs the GPU's capability even if a tool below hangs.
step env "$CAP_ENV" env.txt bash -c '
  date -u; echo "cores $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
  "$1" -c "import sys, torch
print(\"python\", sys.version.split()[0])
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda,
      \"available\", torch.cuda.is_available())
if torch.cuda.is_available():
    print(\"device\", torch.cuda.get_device_name(0))
    print(\"capability %d.%d\" % torch.cuda.get_device_capability(0))"
  command -v nvcc >/dev/null && nvcc --version | tail -2
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -2 \
    || echo "compute-sanitizer: not found"
  nvidia-smi || echo "nvidia-smi: not available"' gpu_check_env "$PY"

if [ "$MODE" = gpu ] && [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  # This GPU's architecture only (sm_90 on an H200): no time spent on others.
  TORCH_CUDA_ARCH_LIST=$(sed -n 's/^capability //p' "$OUT/env.txt")
  [ -n "$TORCH_CUDA_ARCH_LIST" ] && export TORCH_CUDA_ARCH_LIST
fi
echo "MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-}" >> "$OUT/env.txt"
echo "${TORCH_CUDA_ARCH_LIST:-}" > "$OUT/arch.txt"

# ---- 1. build -------------------------------------------------------------------------------
# The peak kernels are cached where the benchmark step looks (torch.utils.cpp_extension.load).
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions}
build_ok=0
if [ "$MODE" = gpu ] && [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  skip build "$CAP_BUILD" "no CUDA device visible to torch (see env.txt)"
else
  if [ "$MODE" = gpu ]; then BUILD_CUDA=1; PEAK_CUDA=True; else BUILD_CUDA=0; PEAK_CUDA=False; fi
  step peak-build "$CAP_BUILD" peak-build.log \
    "$PY" -c "from benchmarks import peak; peak._native(cuda=$PEAK_CUDA)" &
  peak_pid=$!
  step build "$CAP_BUILD" build.log env PYENGINE_CUDA=$BUILD_CUDA \
    "$PY" setup.py build_ext --inplace \
    && step build-check "$CAP_BUILD_CHECK" build-check.log "$PY" -c "
import pyengine
print('pyengine._C.built_with_cuda:', pyengine._C.built_with_cuda)
assert pyengine._C.built_with_cuda == bool($BUILD_CUDA), 'not the build this mode asks for'" \
    && build_ok=1
  wait "$peak_pid"
fi

# ---- 2-4. the test suite | CUDA graphs and compute-sanitizer, at once ----------------------------
if [ $build_ok -ne 1 ]; then
  for s in tests graph memcheck racecheck synccheck initcheck; do
    skip "$s" "$CAP_LANE" "the build failed"
  done
elif [ "$MODE" = gpu ]; then
  sanitize() {  # sanitize TOOL CAP KERNEL_FILTER SELECTION...: KERNEL_FILTER "" checks all
    local tool=$1 cap=$2 filter=$3 flags=()
    shift 3
    if ! command -v compute-sanitizer >/dev/null; then
      skip "$tool" "$cap" "compute-sanitizer not found"
      return
    fi
    [ -n "$filter" ] && flags=(--kernel-name "kns=$filter")
    step "$tool" "$cap" "$tool.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool "$tool" --target-processes all --report-api-errors no \
      --print-limit 100 --error-exitcode 99 "${flags[@]}" "${PYTEST[@]}" "$@"
  }
  (
    step graph "$CAP_GRAPH" graph.log "${PYTEST[@]}" --junitxml="$OUT/graph.xml" \
      "${GRAPH_SELECTION[@]}"
    sanitize memcheck "$CAP_MEMCHECK" "" "${MEMCHECK_SELECTION[@]}"
    sanitize racecheck "$CAP_RACECHECK" pyengine "${SANITIZER_SELECTION[@]}"
    sanitize synccheck "$CAP_SYNCCHECK" pyengine "${SANITIZER_SELECTION[@]}"
    sanitize initcheck "$CAP_INITCHECK" "" "${INITCHECK_SELECTION[@]}"
  ) &
  lane_pid=$!
  # Workers of 2 threads each, leaving cores to the sanitizer lane beside it.
  parallel=()
  if "$PY" -c "import xdist" 2>/dev/null; then
    workers=$(( CORES > 16 ? 12 : (CORES > 4 ? CORES - 4 : 1) ))
    [ "$workers" -gt 1 ] && parallel=(-n "$workers")
  fi
  # shellcheck disable=SC2086  # PYTEST_ARGS: extra arguments, split on purpose
  step tests "$CAP_LANE" tests.log env OMP_NUM_THREADS=2 \
    "${PYTEST[@]}" -rfE --junitxml="$OUT/tests.xml" "${parallel[@]}" "${SUITE_SELECTION[@]}" \
    ${PYTEST_ARGS:-}
  wait "$lane_pid"
else
  # Rehearsal: the same selections, collected (test_cuda.py's tests are collected without a GPU,
  # and skipped only when run), so each must select something.
  # shellcheck disable=SC2086
  step tests "$CAP_LANE" tests.log "${PYTEST[@]}" --collect-only "${SUITE_SELECTION[@]}" \
    ${PYTEST_ARGS:-}
  step graph "$CAP_GRAPH" graph.log "${PYTEST[@]}" --collect-only "${GRAPH_SELECTION[@]}"
  step memcheck "$CAP_MEMCHECK" memcheck.log "${PYTEST[@]}" --collect-only \
    "${MEMCHECK_SELECTION[@]}"
  for tool in racecheck synccheck; do
    cap_var=CAP_${tool^^}
    step "$tool" "${!cap_var}" "$tool.log" "${PYTEST[@]}" --collect-only \
      "${SANITIZER_SELECTION[@]}"
  done
  step initcheck "$CAP_INITCHECK" initcheck.log "${PYTEST[@]}" --collect-only \
    "${INITCHECK_SELECTION[@]}"
fi

# ---- 5. benchmark ---------------------------------------------------------------------------
# The suite starts no case after its --time-limit, leaving time to write what it has.
BENCH_LIMIT=$(( CAP_BENCH - 25 ))
if [ $build_ok -ne 1 ]; then
  skip bench "$CAP_BENCH" "the build failed"
elif [ "$MODE" = gpu ]; then
  step bench "$CAP_BENCH" bench.log "$PY" -m benchmarks --device cuda --gpu-check --runs 30 \
    --time-limit "$BENCH_LIMIT"
  results=$(sed -n 's/^wrote \(.*\)\/results\.csv.*/\1/p' "$OUT/bench.log" | tail -1)
  if [ -n "$results" ]; then
    mkdir -p "$OUT/bench-results" && cp -r "$results" "$OUT/bench-results/"
  fi
else
  step bench "$CAP_BENCH" bench.log "$PY" -m benchmarks --device cpu --gpu-check --runs 3 \
    --lenet-batches 8 16 --time-limit "$BENCH_LIMIT" --out "$OUT/bench-results/rehearsal-cpu"
fi

# ---- 6. summary -----------------------------------------------------------------------------
"$PY" tools/gpu_check_summary.py "$OUT" --mode "$MODE" | tee "$OUT/summary.txt"
exit "${PIPESTATUS[0]}"
