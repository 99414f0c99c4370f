# The README's commands. Each installs what it needs into the active Python environment first
# (torch >= 2.4 is used as installed; a missing torch is fetched from the package registry).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install test train bench bench-all gpu-check clean

install:
	$(PIP) install -q --upgrade pip setuptools wheel packaging
	$(PIP) install -q "torch>=2.4" numpy ninja pytest expecttest scikit-learn matplotlib tqdm
	$(PIP) install -q --no-build-isolation -e .

# The whole test suite (builds the extension first).
test: install
	$(PYTHON) -m pytest -q

# The main job: train LeNet on handwritten digits with pyengine's kernels, then with torch.nn.
train: install
	$(PYTHON) -m pyengine train

# CPU benchmark: a LeNet training step, pyengine against torch.nn.
bench: install
	$(PYTHON) -m benchmarks.lenet_step

# The whole benchmark suite (per op and per network; CSV, markdown table, plots).
bench-all: install
	$(PYTHON) -m benchmarks

# On a GPU machine (torch with CUDA, nvcc): build with CUDA, whole suite, compute-sanitizer.
gpu-check:
	bash tools/gpu_check.sh

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

.PHONY: fuzz asan
