"""The emulation lane's build: pyengine's CUDA glue and kernels (csrc/cuda), unmodified, compiled as
host C++ against the CUDA emulator of this folder, loaded as the extension `pyengine_cuda_emu`.

    import lane
    emu = lane.load()            # builds on first use (cached under build/cuda-emu/), then loads
    torch.ops.pyengine_emu.conv2d(x, w, None, [1, 1], [0, 0], [1, 1], 1)   # CPU tensors in,
                                                                           # emulated CUDA kernels
    emu.set_schedule("reversed", 7); emu.set_cap("kMaxBlocks", 2); ...

How: every csrc/cuda/*.cu goes through rewrite.py (launch syntax and __shared__ declarations,
line numbers kept) into build/cuda-emu*/src/, and is compiled with g++ against include/ (the
emulated <cuda_runtime.h>) and emu.cpp. Every csrc/cuda/*_glue.cpp is compiled as it is, with
torch_shim/ standing in for c10/cuda (guard, stream, C10_CUDA_CHECK) and glue_prelude.h sending
its TORCH_LIBRARY_IMPL(pyengine, CUDA) registration to the CPU key of the library `pyengine_emu`,
whose schemas load() copies from pyengine's own (csrc/ops.cpp, through the dispatcher). So the
real glue (checks, allocation, layouts, workspaces) and the real kernels run, on CPU tensors that
stand for CUDA ones, in the same process as pyengine's CPU kernels they are compared with.

PYENGINE_EMU_SANITIZE=address,undefined builds a separate, instrumented copy (make cuda-emu-asan,
which preloads the ASan runtime).
"""
import hashlib
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
CUDA_SRC = os.path.join(CSRC, "cuda")
LIBRARY = "pyengine_emu"
MODULE = "pyengine_cuda_emu"

sys.path.insert(0, HERE)
import rewrite  # noqa: E402  (tests/cuda_emu/rewrite.py)


def sanitizers() -> str:
    return os.environ.get("PYENGINE_EMU_SANITIZE", "").strip()


def _write_if_changed(path: str, text: str) -> None:
    """Keeps the file (and its time) when its text is the same, so ninja rebuilds only what
    changed."""
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except OSError:
        pass
    with open(path, "w") as f:
        f.write(text)


def _sources(build_dir: str) -> list:
    """The translation units: rewritten kernels, one wrapper per glue file, the emulator and the
    module's bindings."""
    src = os.path.join(build_dir, "src")
    os.makedirs(os.path.join(src, "cuda"), exist_ok=True)
    units = []
    for name in sorted(os.listdir(CUDA_SRC)):
        path = os.path.join(CUDA_SRC, name)
        if name.endswith((".cu", ".cuh")):
            with open(path) as f:
                text = rewrite.rewrite(f.read(), filename=path)
            # Kernels as C++ in src/cuda/ (first on the include path, so "cuda/gemm.cuh" is the
            # rewritten one); rewrite() keeps compiler messages and device asserts on csrc's
            # lines.
            out = os.path.join(src, "cuda", name + (".cpp" if name.endswith(".cu") else ""))
            _write_if_changed(out, text)
            if name.endswith(".cu"):
                units.append(out)
        elif name.endswith("_glue.cpp"):
            out = os.path.join(src, name)
            _write_if_changed(out, '#include "glue_prelude.h"\n'
                                   f'#include "cuda/{name}"\n')
            units.append(out)
    # The glue allocates its outputs through csrc/common/layout.h, which takes CPU tensors' (the
    # lane's) from pyengine's CPU block cache: the cache comes along, unmodified.
    cache = os.path.join(os.path.dirname(CUDA_SRC), "cpu", "allocator.cpp")
    return units + [cache, os.path.join(HERE, "emu.cpp"), os.path.join(HERE, "module.cpp")]


def _flags(sanitize: str):
    # The C++ standard is torch's (C++20 for torch 2.13, as the real build's glue); nvcc's C++17 for
    # the kernels is held by tests/test_cuda_build.py. -Wno-unknown-pragmas: #pragma unroll.
    cflags = ["-O2", "-g0", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas"]
    ldflags = []
    if sanitize:
        cflags += ["-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={sanitize}",
                   "-fno-sanitize-recover=all"]
        ldflags.append(f"-fsanitize={sanitize}")
    return cflags, ldflags


_loaded = None


def load(verbose: bool = False):
    """Builds (incrementally) and loads the emulated CUDA extension; defines the pyengine_emu
    schemas from pyengine's. Returns the module (the emulator's controls: module.cpp)."""
    global _loaded
    if _loaded is not None:
        return _loaded
    import torch
    import pyengine  # noqa: F401  (registers the pyengine schemas copied below)
    from torch.utils.cpp_extension import load as load_extension

    sanitize = sanitizers()
    tag = "cuda-emu" + ("-" + hashlib.sha1(sanitize.encode()).hexdigest()[:8] if sanitize else "")
    build_dir = os.path.join(ROOT, "build", tag)
    os.makedirs(build_dir, exist_ok=True)
    cflags, ldflags = _flags(sanitize)
    _define_schemas(torch)
    _loaded = load_extension(
        name=MODULE + ("_sanitized" if sanitize else ""),
        sources=_sources(build_dir),
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        # The emulated <cuda_runtime.h> and the c10/cuda stand-ins come before anything else.
        extra_include_paths=[os.path.join(HERE, "include"), os.path.join(HERE, "torch_shim"),
                             HERE, os.path.join(build_dir, "src"), CSRC],
        build_directory=build_dir,
        with_cuda=False,
        verbose=verbose,
    )
    return _loaded


_schemas_defined = []


def _define_schemas(torch) -> None:
    """The library pyengine_emu with pyengine's schemas, word for word (csrc/ops.cpp is the one
    list), so the glue's registrations land on operators of the same signatures."""
    if _schemas_defined:
        return
    lib = torch.library.Library(LIBRARY, "DEF")
    names = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                   if n.startswith("pyengine::"))
    for name in names:
        schema = str(torch._C._get_schema("pyengine::" + name, ""))
        lib.define(schema.split("::", 1)[1])
    _schemas_defined.append(lib)  # kept alive: dropping the Library would undefine them


def available() -> str:
    """'' when the lane can build here, else why not (a skip reason)."""
    import shutil

    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return "the CUDA emulator needs Linux on x86-64 (ucontext fibers)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler"
    if importlib.util.find_spec("ninja") is None and shutil.which("ninja") is None:
        return "ninja is not installed"
    return ""
