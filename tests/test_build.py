"""The build and install steps behave on every kind of machine: which kernels setup.py compiles
(CPU-only or CUDA, and for which GPU architectures when none is visible), the refusal of pip's
isolated build, and the install step's "only what is missing, rebuild only what changed"."""
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup.py calls setup() only when run as __main__
    return module


@pytest.fixture
def setup_py(monkeypatch, tmp_path):
    module = _load("pyengine_setup", os.path.join(ROOT, "setup.py"))
    monkeypatch.setattr(module, "NOTICE_FILE", str(tmp_path / "notice.txt"))
    for name in ("PYENGINE_CUDA", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(name, raising=False)
    return module


def _machine(monkeypatch, setup_py, torch_cuda, nvcc, gpus, headers=True):
    """Pretends: torch built with CUDA `torch_cuda` (or None), a CUDA toolkit or not (with its
    headers under CUDA_HOME or not), `gpus` visible GPUs."""
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setattr(setup_py, "CUDA_HOME", "/usr/local/cuda" if nvcc else None)
    monkeypatch.setattr(setup_py, "has_cuda_headers", lambda: bool(nvcc and headers))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)


def _notice(setup_py):
    path = setup_py.NOTICE_FILE
    return open(path).read() if os.path.exists(path) else ""


@pytest.mark.parametrize("torch_cuda,nvcc,gpus,arch_list,expected", [
    (None, False, 0, "", False),       # CPU torch
    (None, True, 0, "", False),        # CPU torch, nvcc present
    ("13.0", False, 0, "", False),     # CUDA torch, no toolkit
    ("13.0", True, 1, "", True),       # CUDA torch, toolkit, a GPU
    ("13.0", True, 0, "9.0", True),    # no GPU, but the architectures are named
    ("13.0", True, 0, "", False),      # no GPU, none named: CPU-only with a notice
])
def test_which_kernels_are_built(monkeypatch, setup_py, torch_cuda, nvcc, gpus, arch_list,
                                 expected):
    _machine(monkeypatch, setup_py, torch_cuda, nvcc, gpus)
    if arch_list:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    assert setup_py.want_cuda() is expected
    notice = _notice(setup_py)
    if torch_cuda and not expected:
        # One line, saying how to get the CUDA kernels.
        assert notice.count("\n") == 1 and "CPU-only" in notice
        assert ("PYENGINE_CUDA=1" in notice) if nvcc else ("CUDA_HOME" in notice)
    else:
        assert notice == ""


def test_forced_builds(monkeypatch, setup_py):
    _machine(monkeypatch, setup_py, "13.0", True, 0)
    monkeypatch.setenv("PYENGINE_CUDA", "0")
    assert setup_py.want_cuda() is False
    monkeypatch.setattr(setup_py, "default_cuda_arches", lambda: "8.0;9.0+PTX")
    monkeypatch.setenv("PYENGINE_CUDA", "1")
    assert setup_py.want_cuda() is True
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0+PTX"
    assert "TORCH_CUDA_ARCH_LIST=8.0;9.0+PTX" in _notice(setup_py)

    _machine(monkeypatch, setup_py, "13.0", False, 0)
    with pytest.raises(SystemExit, match="no CUDA toolkit"):
        setup_py.want_cuda()
    _machine(monkeypatch, setup_py, None, True, 0)
    with pytest.raises(SystemExit, match="built without CUDA"):
        setup_py.want_cuda()
    _machine(monkeypatch, setup_py, "13.0", True, 0, headers=False)
    with pytest.raises(SystemExit,
                       match="CUDA_HOME=/usr/local/cuda has no include/cuda_runtime.h"):
        setup_py.want_cuda()


def test_nvcc_without_headers_builds_cpu_only_and_says_why(monkeypatch, setup_py):
    """nvcc found where CUDA_HOME has no headers (torch guessed it from an nvcc in /usr/local/bin):
    CPU-only with a notice, even with a GPU, instead of a compile error half-way through."""
    _machine(monkeypatch, setup_py, "13.0", True, 1, headers=False)
    assert setup_py.want_cuda() is False
    assert "CUDA_HOME=/usr/local/cuda has no include/cuda_runtime.h" in _notice(setup_py)


def test_the_cuda_headers_are_looked_for_under_cuda_home(monkeypatch, setup_py, tmp_path):
    monkeypatch.setattr(setup_py, "CUDA_HOME", str(tmp_path))
    assert not setup_py.has_cuda_headers()
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime.h").write_text("")
    assert setup_py.has_cuda_headers()


NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_default_architectures_compile_with_this_nvcc(monkeypatch, setup_py, tmp_path):
    """With no GPU, PYENGINE_CUDA=1 compiles for what this torch and this nvcc both support; torch
    turns the list into -gencode flags that nvcc accepts."""
    monkeypatch.setattr(setup_py, "CUDA_HOME", os.path.dirname(os.path.dirname(
        os.path.realpath(NVCC))))
    # A CUDA torch's list (torch 2.14 + CUDA 13.0); a CPU torch has none of its own.
    monkeypatch.setattr(torch._C, "_cuda_getArchFlags",
                        lambda: "sm_75 sm_80 sm_86 sm_90 sm_100 sm_120", raising=False)
    listed = subprocess.run([NVCC, "--list-gpu-code"], capture_output=True, text=True).stdout
    arches = setup_py.default_cuda_arches()
    names = arches.replace("+PTX", "").split(";")
    assert names == sorted(names, key=setup_py._arch_key) and arches.endswith("+PTX")
    assert all(f"sm_{n.replace('.', '')}" in listed for n in names), (arches, listed)
    assert set(names) <= {"7.5", "8.0", "8.6", "9.0", "10.0", "12.0"}
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arches)
    flags = _get_cuda_arch_flags()
    assert len(flags) == len(names) + 1  # one per architecture, plus the newest's PTX
    kernel = tmp_path / "k.cu"
    kernel.write_text("__global__ void k(float* x) { x[threadIdx.x] *= 2.0f; }\n")
    out = subprocess.run([NVCC, "-c", str(kernel), "-o", str(tmp_path / "k.o"), *flags],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_isolated_build_refuses_with_the_command_to_use(tmp_path):
    """`pip install .` builds in an isolated environment without the user's torch: setup.py
    stops there and names the commands that work, instead of compiling against another torch."""
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path),
                          ROOT], capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    if "pip install --no-build-isolation" not in text and (
            "No matching distribution" in text or "Could not find a version" in text):
        pytest.skip("pip cannot fetch the build tools (setuptools) here: offline")
    assert out.returncode != 0
    assert "pip install --no-build-isolation ." in text, text[-3000:]


# ---- tools/install.py ---------------------------------------------------------------------

@pytest.fixture
def install_py():
    return _load("pyengine_install", os.path.join(ROOT, "tools", "install.py"))


def test_install_reads_pyproject(install_py):
    build, runtime = install_py.pyproject_requirements(["test", "train"])
    assert "torch" not in " ".join(build)  # see pyproject.toml: no torch in the isolated build
    assert any(r.startswith("setuptools") for r in build)
    assert "torch>=2.4" in runtime and "pytest" in runtime and "scikit-learn" in runtime
    with pytest.raises(SystemExit, match="no extra named 'gpu'"):
        install_py.pyproject_requirements(["gpu"])


def test_install_installs_only_what_is_missing(install_py):
    assert install_py.missing(["torch>=2.4", "pytest"]) == []
    assert install_py.missing(["torch>=999.0"]) == ["torch>=999.0"]
    assert install_py.missing(["no-such-package-pyengine-test"]) == ["no-such-package-pyengine-test"]


def test_install_fingerprint_follows_sources_and_settings(install_py, monkeypatch, tmp_path):
    tree = tmp_path / "tree"
    (tree / "csrc").mkdir(parents=True)
    (tree / "csrc" / "op.cpp").write_text("int f() { return 1; }\n")
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, name), tree / name)
    monkeypatch.setattr(install_py, "ROOT", str(tree))
    monkeypatch.delenv("PYENGINE_DEBUG", raising=False)
    first = install_py.fingerprint()
    assert install_py.fingerprint() == first
    os.utime(tree / "csrc" / "op.cpp")  # touched, same content: nothing to rebuild
    assert install_py.fingerprint() == first
    (tree / "csrc" / "op.cpp").write_text("int f() { return 2; }\n")
    second = install_py.fingerprint()
    assert second != first
    monkeypatch.setenv("PYENGINE_DEBUG", "1")
    assert install_py.fingerprint() != second



@pytest.mark.skipif(not sys.platform.startswith("linux") or not shutil.which("readelf")
                    or not shutil.which("nm"), reason="needs Linux binutils (readelf, nm)")
def test_the_extension_links_the_shared_cxx_runtime():
    """pyengine._C needs libstdc++.so.6, the runtime torch and Python load, and defines none of
    its own: a toolchain that linked libstdc++ statically (the g++ wrapper of a CUDA image) made
    every check that formats a message crash the process (setup.py)."""
    import pyengine

    path = pyengine._C.__file__
    needed = subprocess.run(["readelf", "-d", path], capture_output=True, text=True).stdout
    assert "[libstdc++.so.6]" in needed, needed
    defined = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True,
                             text=True).stdout.split()
    assert "__cxa_throw" not in defined and "__cxa_allocate_exception" not in defined
