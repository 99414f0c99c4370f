"""The CUDA emulator (tests/cuda_emu) catches what it claims to, and accepts every csrc/cuda source.

* rewrite.py rewrites every `<<<...>>>` launch and `__shared__` declaration of csrc/cuda, and
  nothing else, keeping line numbers;
* every csrc/cuda/*.cu compiles unmodified (after rewrite.py) against the emulator's headers, and
  links with the runtime and tests/cuda_emu/selftest.cpp, all built with
  -fsanitize=address,undefined;
* each selftest case runs in its own process: a missing barrier shows under different schedules,
  shared-memory overruns are reported by ASan / UBSan, a skipped shuffle is a reported deadlock,
  a device assert is a sticky cudaErrorAssert, bad launch configurations are refused, divergent
  barriers are reported, device.cuh's reductions are exact under every schedule, and a few
  csrc/cuda launchers give the right numbers.

The build is cached under build/cuda_emu/<hash of its inputs and flags>/ (a cold build takes
~20-30 s on 2 cores, two compilations at a time).
"""
import concurrent.futures
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU = os.path.join(ROOT, "tests", "cuda_emu")
CSRC = os.path.join(ROOT, "csrc")
CU_FILES = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
CUH_FILES = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cuh")))
GXX = shutil.which("g++")
FLAGS = ["-std=c++17", "-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
         "-fno-omit-frame-pointer"]

sys.path.insert(0, EMU)
import rewrite as rw  # noqa: E402

needs_gxx = pytest.mark.skipif(GXX is None, reason="g++ not found: the CUDA emulator cannot be "
                               "built on this machine")


# ---- rewrite.py ----------------------------------------------------------------------------------

def _code_count(text, token):
    mask = rw._code_mask(text)
    return sum(1 for m in re.finditer(re.escape(token), text) if mask[m.start()])


@pytest.mark.parametrize("path", CU_FILES + CUH_FILES, ids=os.path.basename)
def test_rewrite_touches_only_launches_and_shared(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    edits = rw.edits(text)
    out = rw.rewrite(text)
    launches = [e for e in edits if e[2].startswith("::pe_emu::launch(")]
    shared = [e for e in edits if "::pe_emu::shared<" in e[2] or "dynamic_shared<" in e[2]]
    assert len(launches) + len(shared) == len(edits)
    assert len(launches) == _code_count(text, "<<<") == _code_count(text, ">>>")
    assert len(shared) == _code_count(text, "__shared__")
    for start, end, new in launches:
        span = text[start:end]
        assert re.fullmatch(r"[\w:]+(<[^;{}]*>)?\s*<<<[^;{}]*>>>\s*", span), span
        # The launch keeps the kernel expression and the configuration, verbatim.
        kernel, config = re.match(r"([\w:]+(?:<[^;{}]*?>)?)\s*<<<(.*)>>>", span, re.S).groups()
        assert new.startswith("::pe_emu::launch(" + kernel)
        assert config in new
        assert new.count("\n") == span.count("\n")
    for start, end, new in shared:
        assert "__shared__" in text[start:end] and text[end - 1] == ";"
        assert new.count("\n") == text[start:end].count("\n")
    # Everything outside the spans is unchanged, in order, and every line keeps its number.
    pos, last = 0, 0
    for start, end, new in edits:
        for piece in (text[last:start], new):
            assert out.startswith(piece, pos)
            pos += len(piece)
        last = end
    assert out[pos:] == text[last:]
    assert out.count("\n") == text.count("\n")
    assert _code_count(out, "<<<") == 0 and _code_count(out, "__shared__") == 0
    # With a file name, a #line directive names the source without shifting its lines.
    assert rw.rewrite(text, "csrc/cuda/x.cu") == '#line 1 "csrc/cuda/x.cu"\n' + out


def test_rewrite_forms():
    src = ('// k<<<1, 2>>>(x) in a comment, "<<<" in a string, __shared__ too\n'
           "  ns::kern<T, Op<U, 3>>\n"
           "      <<<dim3(a, static_cast<unsigned>(b)),\n"
           "         f(c, d)>>>(x, y);\n"
           "  k2<<<g, b, s, stream>>>();\n"
           "  __shared__ float tile[16][17];\n"
           "  extern __shared__ unsigned char dyn[];\n"
           "  static __shared__ volatile int flag;\n")
    out = rw.rewrite(src)
    lines = out.split("\n")
    assert lines[0] == src.split("\n")[0]
    assert lines[1] == "  ::pe_emu::launch(ns::kern<T, Op<U, 3>>"
    assert lines[2] == "      , dim3(a, static_cast<unsigned>(b)),"
    assert lines[3] == ('         f(c, d), 0, 0, "ns::kern<T, Op<U, 3>>", __FILE__, __LINE__)'
                        "(x, y);")
    assert lines[4] == '  ::pe_emu::launch(k2, g, b, s, stream, "k2", __FILE__, __LINE__)();'
    assert lines[5] == ('  float (&tile)[16][17] = ::pe_emu::shared<float[16][17]>([] {}, '
                        '"tile");')
    assert lines[6] == ('  unsigned char (&dyn)[] = ::pe_emu::dynamic_shared<unsigned char>'
                        '("dyn");')
    assert lines[7] == ('  volatile int& flag = ::pe_emu::shared<volatile int>([] {}, "flag");')
    assert len(lines) == len(src.split("\n"))


@pytest.mark.parametrize("src, fragment", [
    ("__shared__ float a[4], b[4];", "one declarator"),
    ("__shared__ float a[4] = {0};", "one declarator"),
    ("__shared__ float a[];", "needs its size"),
    ("extern __shared__ float a[4];", "unknown bound"),
    ("k<<<1>>>(x);", "2 to 4 values"),
    ("k<<<1, 2, 3, 4, 5>>>(x);", "2 to 4 values"),
    ("k<<<1, 2>>>;", "no argument list"),
    ("k<<<1, 2 (x);", "no >>>"),
])
def test_rewrite_refuses(src, fragment):
    with pytest.raises(rw.RewriteError, match=fragment):
        rw.rewrite("void f() {\n" + src + "\n}\n")


# ---- The build -----------------------------------------------------------------------------------

def _inputs():
    files = [os.path.join(EMU, n) for n in ("emu.cpp", "emu.h", "rewrite.py", "selftest.cpp")]
    files += sorted(glob.glob(os.path.join(EMU, "include", "*.h")))
    files += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu*")))
    files += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.h")))
    files += sorted(glob.glob(os.path.join(CSRC, "common", "*.h")))
    return files


def _build_key():
    h = hashlib.sha256()
    version = subprocess.run([GXX, "--version"], capture_output=True, text=True).stdout
    h.update(version.encode())
    h.update(" ".join(FLAGS).encode())
    for path in _inputs():
        h.update(os.path.relpath(path, ROOT).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def _compile(args):
    proc = subprocess.run([GXX] + args, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return f"g++ {' '.join(args)}\n{proc.stdout}{proc.stderr}"
    return None


def _build(dest):
    """Rewrites and compiles into a fresh directory, renamed to `dest` once complete."""
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix="tmp-")
    src = os.path.join(tmp, "src")
    os.makedirs(os.path.join(src, "cuda"))
    rewritten = []
    for path in CU_FILES + CUH_FILES + [os.path.join(EMU, "selftest.cpp")]:
        rel = os.path.relpath(path, ROOT)
        sub = "cuda" if path.startswith(CSRC) else ""
        out = os.path.join(src, sub, os.path.basename(path))
        with open(path, encoding="utf-8") as f:
            text = rw.rewrite(f.read(), rel)
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
        rewritten.append(out)
    # The rewritten headers come before csrc's originals; the emulator's before CUDA's.
    includes = ["-I" + os.path.join(EMU, "include"), "-I" + src, "-I" + CSRC]
    jobs, objects = [], []
    for path in [p for p in rewritten if p.endswith((".cu", ".cpp"))] + \
            [os.path.join(EMU, "emu.cpp")]:
        obj = os.path.join(tmp, os.path.basename(path) + ".o")
        objects.append(obj)
        jobs.append(FLAGS + includes + ["-x", "c++", "-c", path, "-o", obj])
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        errors = [e for e in pool.map(_compile, jobs) if e]
    if errors:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AssertionError("the CUDA emulator build failed:\n" + "\n".join(errors))
    err = _compile(FLAGS + objects + ["-o", os.path.join(tmp, "selftest")])
    if err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AssertionError(err)
    try:
        os.rename(tmp, dest)
    except OSError:  # built concurrently by another run: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    for old in glob.glob(os.path.join(parent, "*")):
        if old != dest and not os.path.basename(old).startswith("tmp-"):
            shutil.rmtree(old, ignore_errors=True)


@pytest.fixture(scope="module")
def emu_build():
    dest = os.path.join(ROOT, "build", "cuda_emu", _build_key())
    if not os.path.isfile(os.path.join(dest, "selftest")):
        _build(dest)
    return dest


def _run_case(build, case):
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1", UBSAN_OPTIONS="print_stacktrace=1")
    proc = subprocess.run([os.path.join(build, "selftest"), case], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


@needs_gxx
def test_every_cu_compiles_against_the_emulator(emu_build):
    for path in CU_FILES:
        assert os.path.isfile(os.path.join(emu_build, os.path.basename(path) + ".o")), path


CASES = ["missing_barrier", "shuffle_deadlock", "device_assert", "bad_config",
         "divergent_barrier", "reductions", "warp_intrinsics", "shared_memory", "caps",
         "launchers", "half_conversions", "bf16_conversions"]


@needs_gxx
@pytest.mark.parametrize("case", CASES)
def test_selftest(emu_build, case):
    rc, out, err = _run_case(emu_build, case)
    assert rc == 0 and f"PASS {case}" in out, f"exit {rc}\n{out}\n{err}"
    # No sanitizer report on a passing case.
    assert "ERROR: AddressSanitizer" not in err and "runtime error" not in err, err


@needs_gxx
def test_shared_overrun_reported_by_asan(emu_build):
    rc, out, err = _run_case(emu_build, "shared_overrun")
    assert rc != 0, out
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in err, err
    # ... at the kernel's line, in a 128-byte (32-float) shared allocation.
    assert re.search(r"in shared_overrun_kernel\b.*tests/cuda_emu/selftest\.cpp:\d+", err), err
    assert "0 bytes to the right of 128-byte region" in err, err


@needs_gxx
def test_shared_overrun_reported_by_ubsan(emu_build):
    rc, out, err = _run_case(emu_build, "shared_overrun_indexed")
    assert rc != 0, out
    assert "runtime error: index 32 out of bounds for type 'float [32]'" in err, err
