"""Builds pyengine._C, the compiled operators, with torch.utils.cpp_extension.

CUDA sources are compiled when the installed torch was built with CUDA and nvcc is found;
otherwise the build is CPU-only. Environment overrides:

  PYENGINE_CUDA=1 / PYENGINE_CUDA=0   force the CUDA build on or off
  MAX_JOBS=N                          parallel compile jobs (honoured by torch's ninja build)
  TORCH_CUDA_ARCH_LIST="9.0"          GPU architectures to compile for (honoured by torch)
  PYENGINE_DEBUG=1                    -O0 -g, for debuggers and sanitizers
  PYENGINE_SANITIZE=address,undefined  C++ built with these sanitizers (tools/asan.sh runs them)

Build in place (the test command does this): pip install --no-build-isolation -e .
"""
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - only without torch
    raise SystemExit(
        "pyengine needs PyTorch (>= 2.4) installed before it is built: pip install torch, then "
        "pip install --no-build-isolation -e ."
    ) from exc

from packaging.version import Version

MIN_TORCH = Version("2.4")
if Version(Version(torch.__version__).base_version) < MIN_TORCH:
    raise SystemExit(f"pyengine needs torch >= {MIN_TORCH}, found {torch.__version__}")

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    forced = os.environ.get("PYENGINE_CUDA")
    if forced is not None and forced.strip() != "":
        on = forced.strip().lower() not in ("0", "false", "no", "off")
        if on and CUDA_HOME is None:
            raise SystemExit("PYENGINE_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
        if on and torch.version.cuda is None:
            raise SystemExit("PYENGINE_CUDA=1 but this torch was built without CUDA")
        return on
    return torch.version.cuda is not None and CUDA_HOME is not None


def sources(pattern: str) -> list:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def extension():
    debug = os.environ.get("PYENGINE_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # No -march=native: the wheel must run on any x86-64; hot loops pick their ISA at run time.
    # C++20 (std::bit_cast in the CPU math): torch >= 2.13 builds extensions with it anyway,
    # older torch would default to C++17.
    cxx = opt + ["-std=c++20", "-fvisibility=hidden", "-Wall", "-Wno-unused-function"]
    # at::parallel_for is an inline OpenMP loop in torch's headers: without -fopenmp it quietly
    # runs on one thread. The extension then shares torch's own OpenMP runtime.
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    sanitize = os.environ.get("PYENGINE_SANITIZE", "").strip()
    if sanitize:  # -O1 overrides -O3; a UBSan finding aborts instead of printing and going on;
        # -fno-wrapv undoes Python's -fwrapv, under which signed overflow is not UB (nor reported)
        cxx += ["-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={sanitize}",
                "-fno-sanitize-recover=all", "-fno-wrapv"]
        link.append(f"-fsanitize={sanitize}")
    srcs = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(HERE, "csrc")]
    if want_cuda():
        srcs += sources("csrc/cuda/*.cpp") + sources("csrc/cuda/*.cu")
        nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
        return CUDAExtension(
            "pyengine._C",
            srcs,
            include_dirs=include_dirs,
            define_macros=[("PYENGINE_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    return CppExtension("pyengine._C", srcs, include_dirs=include_dirs,
                        extra_compile_args={"cxx": cxx}, extra_link_args=link)


setup(
    packages=find_packages(include=["pyengine", "pyengine.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
