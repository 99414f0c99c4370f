# The README's commands. Each first runs the install step (tools/install.py): torch >= 2.4 is used
# as installed (a missing torch is fetched from the package registry), missing packages are
# installed, and pyengine is rebuilt only when its sources or build settings changed, so a second
# command on an unchanged tree starts its real work within a second or two.
PYTHON ?= python3

.PHONY: install bench-install test train bench bench-all gpu-check clean fuzz asan cuda-emu-asan

install:
	$(PYTHON) tools/install.py --extras test,train

# The whole test suite (builds the extension first).
test: install
	$(PYTHON) -m pytest -q

# The main job: train LeNet on handwritten digits with pyengine's kernels, then with torch.nn.
train: install
	$(PYTHON) -m pyengine train

# The install step plus JAX, the benchmarks' second peer (pyproject's `bench` extra): tried, and
# if it does not install the benchmarks run without their jax contender.
bench-install:
	$(PYTHON) tools/install.py --extras test,train --optional-extras bench

# CPU benchmark: a LeNet training step, pyengine against torch.nn and jax.jit.
bench: bench-install
	$(PYTHON) -m benchmarks.lenet_step

# The whole benchmark suite (per op and per network; CSV, markdown table, plots).
bench-all: bench-install
	$(PYTHON) -m benchmarks

# On a GPU machine (torch with CUDA, nvcc, compute-sanitizer; no network needed), in under 8
# minutes: build for this GPU, the suite but its slow tests, the CUDA-graph tests, compute-sanitizer
# (memcheck, racecheck, synccheck, initcheck) on trimmed CUDA op tests, the GPU benchmark's quick
# set, a summary; logs in $OUT (default gpu_check_out/). No install step: it would reach for the
# network. `tools/gpu_check.sh --rehearse` runs the same steps in a form that needs no GPU.
gpu-check:
	PYTHON=$(PYTHON) bash tools/gpu_check.sh

clean:
	rm -rf build pyengine/_C*.so *.egg-info

# Differential fuzzing against torch, the long run: every operator for FUZZ_SECONDS (and at most
# FUZZ_CASES cases, if set) with fresh seeds; a summary line per operator, and for each failure
# its shrunk case and a replay command. (The suite runs a short, fixed-seed lane of it.)
FUZZ_SECONDS ?= 20
fuzz: install
	PYENGINE_RANDOM_SEED=1 PYENGINE_FUZZ_SECONDS=$(FUZZ_SECONDS) \
	$(if $(FUZZ_CASES),PYENGINE_FUZZ_CASES=$(FUZZ_CASES)) \
	$(PYTHON) -m pytest -q -s -p no:cacheprovider tests/test_fuzz.py

# The test suite against a build with AddressSanitizer and UndefinedBehaviorSanitizer, made in
# build/asan/ (the in-place build is left alone); slow: see tools/asan.sh.
asan: install
	PYTHON=$(PYTHON) bash tools/asan.sh

# The CUDA emulation lane (csrc/cuda's kernels run on the CPU: tests/cuda_emu) with the kernels,
# the glue and the emulator built with AddressSanitizer and UndefinedBehaviorSanitizer.
cuda-emu-asan: install
	PYTHON=$(PYTHON) bash tools/asan.sh --cuda-emu
