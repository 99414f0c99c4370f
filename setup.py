"""Builds pyengine._C, the compiled operators, with torch.utils.cpp_extension, against the torch
that is installed (so: pip install --no-build-isolation -e . ; `make test` does it for you).

Which kernels are compiled:
  * CPU only, when torch has no CUDA or no CUDA toolkit (nvcc) is found;
  * CPU and CUDA, when torch has CUDA, nvcc is found, and there is an architecture to compile
    for: a visible GPU's, or the ones TORCH_CUDA_ARCH_LIST names;
  * with a CUDA torch and nvcc but no visible GPU and no TORCH_CUDA_ARCH_LIST: CPU only, with a
    one-line notice; PYENGINE_CUDA=1 then compiles for every architecture that both this torch and
    this nvcc support (so the build runs on those GPUs later).

Environment overrides:
  PYENGINE_CUDA=1 / PYENGINE_CUDA=0   force the CUDA build on or off
  TORCH_CUDA_ARCH_LIST="8.0;9.0"      GPU architectures to compile for (honoured by torch)
  MAX_JOBS=N                          parallel compile jobs (honoured by torch's ninja build)
  PYENGINE_DEBUG=1                    -O0 -g (debug info kept), for debuggers
  PYENGINE_SANITIZE=address,undefined  C++ built with these sanitizers (tools/asan.sh runs them)

Objects are kept in build/ between builds, so rebuilding an unchanged tree only relinks.
"""
import os
import re
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
# Where the build writes its one-line notices, so that `make`'s install step (tools/install.py),
# which runs pip quietly, can show them too.
NOTICE_FILE = os.path.join(HERE, "build", "notice.txt")
BUILD_BY_HAND = "pip install --no-build-isolation -e ."

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    # pip's isolated build environment has no torch (pyproject.toml does not ask for one: it would
    # fetch a second torch, maybe another version, and the extension would not load with yours).
    raise SystemExit(
        "pyengine compiles against the torch you will run it with, so it must be built with that "
        "torch installed and visible to the build:\n"
        "    pip install torch            (any version >= 2.4; skip if you have one)\n"
        "    pip install --no-build-isolation .      (or -e . for an editable install)\n"
        "(a plain `pip install .` builds in an isolated environment without your torch.)")

from packaging.version import Version  # noqa: E402  (setuptools needs it too)

MIN_TORCH = Version("2.4")
if Version(Version(torch.__version__).base_version) < MIN_TORCH:
    raise SystemExit(f"pyengine needs torch >= {MIN_TORCH}, found {torch.__version__}")


def notice(message: str) -> None:
    print(f"pyengine: {message}", file=sys.stderr)
    os.makedirs(os.path.dirname(NOTICE_FILE), exist_ok=True)
    with open(NOTICE_FILE, "a") as f:
        f.write(message + "\n")


def _arch_key(arch: str):
    major, minor = arch.split(".")
    return int(major), int(minor)


def default_cuda_arches() -> str:
    """TORCH_CUDA_ARCH_LIST for a build on a machine with no GPU: every architecture that this
    torch was built for (its kernels run there) and this nvcc can compile for, plus PTX of the
    newest so that later GPUs can JIT it."""
    try:
        torch_flags = torch._C._cuda_getArchFlags()  # "sm_75 sm_80 ...": no device needed
    except AttributeError:
        torch_flags = " ".join(torch.cuda.get_arch_list())
    torch_arches = {f"{m[:-1]}.{m[-1]}" for m in re.findall(r"sm_(\d+)", torch_flags)}
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    try:
        listed = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True,
                                timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        listed = ""
    nvcc_arches = {f"{m[:-1]}.{m[-1]}" for m in re.findall(r"sm_(\d+)", listed)}
    # An older nvcc has no --list-gpu-code: then trust torch's list.
    arches = sorted(torch_arches & nvcc_arches if nvcc_arches else torch_arches, key=_arch_key)
    if not arches:
        raise SystemExit(
            f"PYENGINE_CUDA=1 with no GPU visible: this torch ({torch_flags or 'no list'}) and "
            f"this nvcc ({' '.join(sorted(nvcc_arches)) or 'no list'}) share no GPU architecture; "
            "set TORCH_CUDA_ARCH_LIST, e.g. TORCH_CUDA_ARCH_LIST='9.0'")
    return ";".join(arches[:-1] + [arches[-1] + "+PTX"])


def has_cuda_headers() -> bool:
    """Whether CUDA_HOME holds the toolkit's headers. torch takes CUDA_HOME from where nvcc is
    when the variable is unset: an nvcc linked into /usr/local/bin gives /usr/local, whose
    include/ has no cuda_runtime.h, and the glue would fail to compile half-way through."""
    return CUDA_HOME is not None and os.path.isfile(
        os.path.join(CUDA_HOME, "include", "cuda_runtime.h"))


def want_cuda() -> bool:
    """Decides CPU-only or CUDA (see the module docstring); may set TORCH_CUDA_ARCH_LIST."""
    forced = os.environ.get("PYENGINE_CUDA", "").strip().lower()
    has_toolkit = torch.version.cuda is not None and CUDA_HOME is not None and has_cuda_headers()
    if forced in ("0", "false", "no", "off"):
        return False
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if forced:
        if CUDA_HOME is None:
            raise SystemExit("PYENGINE_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
        if torch.version.cuda is None:
            raise SystemExit(f"PYENGINE_CUDA=1 but torch {torch.__version__} was built without "
                             "CUDA; install a CUDA build of torch")
        if not has_cuda_headers():
            raise SystemExit(f"PYENGINE_CUDA=1 but CUDA_HOME={CUDA_HOME} has no "
                             "include/cuda_runtime.h; set CUDA_HOME to the CUDA toolkit's folder "
                             "(e.g. /usr/local/cuda)")
        if not arch_list and torch.cuda.device_count() == 0:
            os.environ["TORCH_CUDA_ARCH_LIST"] = default_cuda_arches()
            notice("no GPU visible: compiling the CUDA kernels for TORCH_CUDA_ARCH_LIST="
                   f"{os.environ['TORCH_CUDA_ARCH_LIST']}")
        return True
    if not has_toolkit:
        if torch.version.cuda is not None and CUDA_HOME is not None:
            notice(f"building CPU-only: CUDA_HOME={CUDA_HOME} has no include/cuda_runtime.h; "
                   "set CUDA_HOME to the CUDA toolkit's folder for the CUDA kernels")
        elif torch.version.cuda is not None:
            notice(f"building CPU-only: torch {torch.__version__} has CUDA but no CUDA toolkit "
                   "(nvcc) was found; install it or set CUDA_HOME for the CUDA kernels")
        return False
    if arch_list or torch.cuda.device_count() > 0:
        return True
    notice("building CPU-only: no GPU is visible and TORCH_CUDA_ARCH_LIST is not set; for the "
           "CUDA kernels too, rebuild with PYENGINE_CUDA=1 (every architecture this torch and "
           "nvcc support) or TORCH_CUDA_ARCH_LIST='8.0;9.0' (the GPUs you target)")
    return False


def sources(pattern: str) -> list:
    import glob

    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def nvcc_flags(debug: bool = False) -> list:
    """What setup.py adds to torch's own nvcc command for the .cu files (tests/test_cuda_build.py
    compiles them with these too). Not the g++ list: nvcc rejects -g0 ("Unknown option"), which
    stopped the first build on a GPU machine; -g / -O3 are host-side there, -lineinfo maps the
    device code to source lines for compute-sanitizer and ncu."""
    return (["-g"] if debug else ["-O3"]) + ["--expt-relaxed-constexpr", "-lineinfo"]


def extension():
    debug = os.environ.get("PYENGINE_DEBUG", "0") == "1"
    sanitize = os.environ.get("PYENGINE_SANITIZE", "").strip()
    # Release builds carry no debug info (Python's own CFLAGS say -g; the later -g0 wins): a
    # third of the compile time and ~90% of the library's size.
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    # No -march=native: the library must run on any x86-64; hot loops pick their ISA at run time.
    # C++20 (std::bit_cast in the CPU math): torch >= 2.13 builds extensions with it anyway,
    # older torch would default to C++17.
    # -fno-trapping-math: pyengine never reads floating-point exception flags, and without it GCC
    # keeps a select such as leaky_relu's `x > 0 ? x : x * slope` as a branch around the multiply
    # (which "may trap"), so the loop does not vectorize where there are no AVX-512 masks: on an
    # AVX2 machine leaky_relu ran 23x slower than torch's and sigmoid 9x. Values are unchanged:
    # it lets the compiler evaluate both arms, it does not reassociate or assume finite math.
    cxx = opt + ["-std=c++20", "-fvisibility=hidden", "-Wall", "-fno-trapping-math"]
    # at::parallel_for is an inline OpenMP loop in torch's headers: without -fopenmp it quietly
    # runs on one thread. The extension then shares torch's own OpenMP runtime.
    link = [] if debug or sanitize else ["-Wl,--strip-debug"]
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
        # The shared C++ runtime, the one torch and Python load, named after the objects. Some
        # toolchains link libstdc++ statically by default (a CUDA image's g++ wrapper whose
        # libstdc++.so is a script over libstdc++.a): the extension then carries a second copy
        # whose iostreams crash the first time a check formats its message (segfault in
        # std::ostream::_M_insert under c10::str, seen on an H200 machine).
        link.append("-l:libstdc++.so.6")
    if sanitize:  # -O1 overrides -O3; a UBSan finding aborts instead of printing and going on;
        # -fno-wrapv undoes Python's -fwrapv, under which signed overflow is not UB (nor reported)
        cxx += ["-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={sanitize}",
                "-fno-sanitize-recover=all", "-fno-wrapv"]
        link.append(f"-fsanitize={sanitize}")
    srcs = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(HERE, "csrc")]
    if want_cuda():
        srcs += sources("csrc/cuda/*.cpp") + sources("csrc/cuda/*.cu")
        nvcc = nvcc_flags(debug)
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


class BuildWithKeptObjects(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension, with the objects kept in build/ (pip's editable builds would
    otherwise use a fresh temporary folder each time and recompile everything); ninja then
    recompiles only what changed. One folder per Python and torch version."""

    def finalize_options(self):
        super().finalize_options()
        tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}"
        self.build_temp = os.path.join(HERE, "build", f"temp-{tag}")


if __name__ == "__main__":  # pip's build backend runs this file as __main__; tests import it
    if os.path.exists(NOTICE_FILE):
        os.remove(NOTICE_FILE)
    setup(
        packages=find_packages(include=["pyengine", "pyengine.*"]),
        ext_modules=[extension()],
        cmdclass={"build_ext": BuildWithKeptObjects},
    )
