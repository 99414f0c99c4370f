"""Shared test helpers: devices, random inputs, comparisons against torch, opcheck."""
import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float32, torch.float64]
# What an error for an unsupported dtype lists (csrc/common/checks.h, check_floating).
SUPPORTED_DTYPES_TEXT = "float32, float64, bfloat16 or float16"

# Tolerances for comparing pyengine with torch: summation order differs, so float32 results
# agree to a few ulps per accumulated term, not bitwise.
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}

# The operators' `reduction` argument (ATen's enum, csrc/ops.cpp) for torch.nn.functional's names.
REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}

devices = pytest.mark.parametrize("device", DEVICES)
dtypes = pytest.mark.parametrize("dtype", FLOAT_DTYPES)


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values as `t` in a non-contiguous tensor (every other element of a wider one)."""
    wide = torch.empty(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
    out = wide[..., ::2]
    out.copy_(t)
    assert not out.is_contiguous() or t.numel() <= 1
    return out


def assert_close(actual, expected, dtype=None, **kw):
    dtype = dtype or (expected.dtype if isinstance(expected, torch.Tensor) else torch.float32)
    tol = dict(TOL.get(dtype, TOL[torch.float32]))
    tol.update(kw)
    torch.testing.assert_close(actual, expected, equal_nan=True, **tol)


def assert_same_strides(actual, expected, what=""):
    """`actual` is laid out as torch's `expected` is: same shape, same strides (so the same memory
    format, channels_last or transposed or contiguous), not merely equal values."""
    assert tuple(actual.shape) == tuple(expected.shape), (what, actual.shape, expected.shape)
    assert actual.stride() == expected.stride(), (
        f"{what}: strides {actual.stride()} for shape {tuple(actual.shape)}, but torch gives "
        f"{expected.stride()}")


def assert_dense(t, what=""):
    """`t` fills its memory exactly once (some ordering of its dims is contiguous): no gaps, no
    overlap, whatever the dim order."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1)
    expected = 1
    for stride, size in dims:
        assert stride == expected, f"{what}: strides {t.stride()} for shape {tuple(t.shape)} " \
            "are not dense"
        expected *= size


def compare_with_torch(ours, theirs, inputs, dtype=None, **tol):
    """Runs ours(*inputs) and theirs(*inputs) on separate leaf copies; compares the outputs and,
    for every floating input that requires grad, the gradients of a random weighted sum."""
    def leaves():
        out = []
        for x in inputs:
            if isinstance(x, torch.Tensor):
                y = x.detach().clone()
                y.requires_grad_(x.requires_grad)
                out.append(y)
            else:
                out.append(x)
        return out

    a_in, b_in = leaves(), leaves()
    a, b = ours(*a_in), theirs(*b_in)
    assert_close(a, b, dtype, **tol)
    if not any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs):
        return a
    g = torch.randn_like(b)
    a.backward(g)
    b.backward(g)
    for x, y in zip(a_in, b_in):
        if isinstance(x, torch.Tensor) and x.requires_grad:
            assert_close(x.grad, y.grad, dtype, **tol)
    return a


def opcheck(op, args, kwargs=None):
    """torch.library.opcheck's four tests (schema, autograd registration, fake tensor, AOT
    dispatch with dynamic shapes), asserting every one passed."""
    result = torch.library.opcheck(op, args, kwargs or {})
    failed = {k: v for k, v in result.items() if v != "SUCCESS"}
    assert not failed, failed


def raises(exc_type, *fragments):
    """pytest.raises that also checks that each fragment appears in the message."""
    import re

    pattern = "".join(f"(?=[\\s\\S]*{re.escape(f)})" for f in fragments)
    return pytest.raises(exc_type, match=pattern)


def run_with_cpu_isa(isa: str, script: str) -> None:
    """Runs `script` in a fresh Python with PYENGINE_CPU_ISA=isa, which pyengine reads at load to
    force a lower instruction set than this machine would pick; asserts it printed "ok"."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYENGINE_CPU_ISA=isa)
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join([here, os.path.dirname(here), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=here, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def set_num_threads(n: int):
    """Context manager: torch.set_num_threads(n) for the block, the old count restored after."""
    import contextlib

    @contextlib.contextmanager
    def scope():
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    return scope()


def cross_entropy_differs_on_cuda(x, t, mean, ignore_index, label_smoothing):
    """Whether torch's cross_entropy gives another result on CUDA than on the CPU for this call,
    and pyengine follows each device: an unbatched input whose class-index target is ignore_index,
    'mean' (`mean` True) without label smoothing, is 0 on CUDA (torch's 1-d CUDA kernel) and
    0 / 0 = NaN on the CPU (csrc/cuda/launchers.h)."""
    return (x.dim() == 1 and not t.is_floating_point() and mean and label_smoothing == 0
            and int(t) == ignore_index)


def conv_layout_device(device, dtype):
    """Where torch convolves with the layouts pyengine's conv2d gives on `device`: there, except
    float64 on CUDA, where torch's convolution is always contiguous (cuDNN has no channels_last
    for double) while pyengine keeps torch's CPU rule, because its Meta kernel (the strides
    torch.compile traces) cannot tell the devices apart (docs/design.md): the CPU."""
    return "cpu" if torch.device(device).type == "cuda" and dtype == torch.float64 else device


def conv_layout_reference(fn, device, dtype):
    """torch's convolution `fn` as the reference for the layouts of pyengine's conv2d on `device`:
    fn itself, or fn on CPU copies with its results brought back to `device`, strides kept
    (Tensor.to keeps them), where conv_layout_device says so."""
    if conv_layout_device(device, dtype) == device:
        return fn

    def on_the_cpu(*args, **kwargs):
        out = fn(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args], **kwargs)
        return torch.utils._pytree.tree_map(
            lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, out)
    return on_the_cpu
