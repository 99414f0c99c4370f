"""The CUDA sources compile, on any machine with nvcc (no GPU needed; skipped without nvcc).

* every csrc/cuda/*.cu compiles on its own with plain nvcc for sm_90, the way the before-stop hook
  checks it (kernels and launchers include only CUDA headers and csrc/common: no torch), with
  torch's -D__CUDA_NO_HALF_CONVERSIONS__ and friends (no implicit 16-bit conversions); ptxas's
  registers and spill stores/loads are printed per kernel (pytest -s, or the file named by
  PYENGINE_PTXAS_REPORT);
* every launcher that csrc/cuda/launchers.h declares is defined, for float, double, __half
  (float16) and __nv_bfloat16 (bfloat16), in those objects (a missing explicit instantiation
  would otherwise surface only when the CUDA build links);
* every torch-facing glue file (csrc/cuda/*.cpp) passes g++ -fsyntax-only against torch's headers
  and the CUDA headers, as the CUDA build compiles it.

The compilations run two at a time (the CI machine has 2 cores) in one module-scoped fixture.
"""
import concurrent.futures
import glob
import importlib.util
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CU_FILES = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
GLUE_FILES = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cpp")))
ARCH = ["-gencode", "arch=compute_90,code=sm_90"]


def _setup_py():
    spec = importlib.util.spec_from_file_location("pyengine_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup.py calls setup() only when run as __main__
    return module


# The flags setup.py gives nvcc in a release build: the objects below are compiled as the
# extension's are (a flag nvcc rejects failed the first real CUDA build, not this test).
SETUP_PY = _setup_py()
SETUP_NVCC_FLAGS = SETUP_PY.nvcc_flags(debug=False)


def _find_nvcc():
    for candidate in (shutil.which("nvcc"),
                      os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"),
                      "/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


NVCC = _find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA sources cannot be "
                                "compile-checked on this machine")


def _cuda_include_dir():
    """The CUDA headers next to nvcc (or under CUDA_HOME / /usr/local/cuda)."""
    candidates = [os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(NVCC))),
                               "include")]
    candidates += [os.path.join(os.environ.get("CUDA_HOME", ""), "include"),
                   "/usr/local/cuda/include"]
    for d in candidates:
        if os.path.isfile(os.path.join(d, "cuda_runtime_api.h")):
            return d
    return None


def _run(cmd):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return list(names)
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout
    lines = out.splitlines()
    return lines if len(lines) == len(names) else list(names)


def parse_ptxas(log):
    """[(kernel, registers, spill stores, spill loads, stack bytes)] from nvcc -Xptxas -v output."""
    kernels, current = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = {"name": m.group(1), "regs": None, "stores": 0, "loads": 0, "stack": 0}
            kernels.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            current["stack"], current["stores"], current["loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["regs"] = int(m.group(1))
    for k, name in zip(kernels, _demangle([k["name"] for k in kernels])):
        k["name"] = name
    return kernels


def _short(name, width=96):
    name = name.replace("pyengine::cuda::", "").replace("(anonymous namespace)::", "")
    name = re.sub(r"\(.*\)$", "", name)  # drop the parameter list
    return name if len(name) <= width else name[: width - 3] + "..."


# torch's CUDAExtension compiles .cu files with these: the 16-bit types have no implicit
# conversions or operators there, so the kernels must convert explicitly (csrc/cuda/device.cuh).
NO_HALF_CONVERSIONS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                       "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def _compile_cu(path, out_dir):
    obj = os.path.join(out_dir, os.path.basename(path) + ".o")
    cmd = [NVCC, "-std=c++17", *SETUP_NVCC_FLAGS, "-c", path, "-o", obj, "-Icsrc", *ARCH,
           *NO_HALF_CONVERSIONS, "-Xptxas", "-v"]
    rc, log = _run(cmd)
    return {"rc": rc, "log": log, "obj": obj, "cmd": " ".join(cmd)}


def _glue_flags(stub_dir):
    import torch.utils.cpp_extension as ext

    flags = ["-std=c++20", "-fsyntax-only", "-DPYENGINE_WITH_CUDA", "-Wall", "-Icsrc"]
    flags += [f"-I{p}" for p in ext.include_paths()]
    # CPU wheels of torch ship c10/cuda but not this generated header (CUDA wheels do): stand in
    # for it with what it holds there.
    if not any(os.path.isfile(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h"))
               for p in ext.include_paths()):
        os.makedirs(os.path.join(stub_dir, "c10", "cuda", "impl"), exist_ok=True)
        with open(os.path.join(stub_dir, "c10", "cuda", "impl", "cuda_cmake_macros.h"), "w") as f:
            f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        flags.append(f"-I{stub_dir}")
    flags.append(f"-I{_cuda_include_dir()}")
    return flags


def _check_glue(path, flags, cxx):
    rc, log = _run([cxx, *flags, path])
    return {"rc": rc, "log": log}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("cuda_objects"))
    cxx = shutil.which("g++")
    results = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {pool.submit(_compile_cu, p, out_dir): p for p in CU_FILES}
        if cxx and _cuda_include_dir():
            flags = _glue_flags(str(tmp_path_factory.mktemp("stub_include")))
            futures.update({pool.submit(_check_glue, p, flags, cxx): p for p in GLUE_FILES})
        for fut, path in futures.items():
            results[path] = fut.result()
    report = os.environ.get("PYENGINE_PTXAS_REPORT")
    if report:
        with open(report, "w") as f:
            for path in CU_FILES:
                f.write(_ptxas_table(path, results[path]["log"]) + "\n")
    return results


def _ptxas_table(path, log):
    rows = [f"{os.path.relpath(path, ROOT)}: registers, spill stores / loads (bytes), stack"]
    for k in parse_ptxas(log):
        flag = "   <-- SPILLS" if k["stores"] or k["loads"] else ""
        regs = k["regs"] if k["regs"] is not None else "?"
        rows.append(f"  {regs:>4} regs  {k['stores']:>4} / {k['loads']:<4} {k['stack']:>4}  "
                    f"{_short(k['name'])}{flag}")
    return "\n".join(rows)


def _rel(path):
    return os.path.relpath(path, ROOT)


@pytest.mark.parametrize("path", CU_FILES, ids=[os.path.basename(p) for p in CU_FILES])
def test_cu_compiles_with_plain_nvcc(builds, path):
    r = builds[path]
    assert r["rc"] == 0, f"{_rel(path)} does not compile:\n{r['cmd']}\n{r['log'][-6000:]}"
    kernels = parse_ptxas(r["log"])
    assert kernels, f"ptxas reported no kernels for {_rel(path)}:\n{r['log'][-2000:]}"
    assert all(k["regs"] is not None for k in kernels), r["log"][-2000:]
    print("\n" + _ptxas_table(path, r["log"]))


def test_nvcc_accepts_the_debug_build_flags(tmp_path):
    """PYENGINE_DEBUG=1's nvcc flags parse (nvcc --dryrun stops at an unknown option)."""
    src = tmp_path / "empty.cu"
    src.write_text("__global__ void k() {}\n")
    cmd = [NVCC, "--dryrun", *SETUP_PY.nvcc_flags(debug=True), "-c", str(src), "-o",
           str(tmp_path / "empty.o")]
    rc, log = _run(cmd)
    assert rc == 0, f"{' '.join(cmd)}:\n{log[-2000:]}"


@pytest.mark.parametrize("path", CU_FILES, ids=[os.path.basename(p) for p in CU_FILES])
def test_kernels_include_no_torch(path):
    """Kernels and launchers stay torch-free, so plain nvcc can check them anywhere."""
    sources = [path] + sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cuh")))
    allowed = re.compile(r'#include\s+(<[^>]+>|"(common/(macros|geometry|elementwise)\.h|'
                         r'cuda/[\w]+\.cuh|cuda/launchers\.h)")')
    for src in sources:
        for line in open(src):
            if line.lstrip().startswith("#include"):
                assert allowed.match(line.strip()), f"{_rel(src)}: {line.strip()}"
                assert not re.search(r"<(torch|ATen|c10)/", line), f"{_rel(src)}: {line.strip()}"


STORAGE_TYPES = ["float", "double", "__half", "__nv_bfloat16"]


def test_every_launcher_is_defined_for_every_storage_type(builds):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not found")
    objs = [builds[p]["obj"] for p in CU_FILES if builds[p]["rc"] == 0]
    assert len(objs) == len(CU_FILES), "a .cu file failed to compile (see the test above)"
    out = subprocess.run([nm, "-C", "--defined-only", *objs], capture_output=True, text=True).stdout
    defined = set()
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[1] in "TW":
            defined.add(re.sub(r"\(.*$", "", parts[2]))
    header = open(os.path.join(CSRC, "cuda", "launchers.h")).read()
    expected = []
    for m in re.finditer(r"(template <typename T>\s*)?\n(cudaError_t|int64_t) (\w+)\(", header):
        name = f"pyengine::cuda::{m.group(3)}"
        expected += [f"{name}<{t}>" for t in STORAGE_TYPES] if m.group(1) else [name]
    assert len(expected) > 20, expected
    missing = [e for e in expected if not any(d.endswith(e) for d in defined)]
    assert not missing, f"declared in launchers.h but defined in no .cu object: {missing}"


@pytest.mark.parametrize("path", GLUE_FILES, ids=[os.path.basename(p) for p in GLUE_FILES])
def test_glue_passes_gxx_syntax_check(builds, path):
    if shutil.which("g++") is None or _cuda_include_dir() is None:
        pytest.skip("g++ or the CUDA headers not found")
    r = builds[path]
    assert r["rc"] == 0, f"{_rel(path)} fails g++ -fsyntax-only:\n{r['log'][-6000:]}"
