"""pyengine's CUDA kernels against its CPU kernels (skipped without a GPU).

* parity: every operator call of every sample (tests/samples.py: the forward op, and the backward
  ops autograd calls), float32 and float64, CUDA against CPU, the arguments in the same layouts on
  both (strided, transposed, channels_last, expanded, offset), output strides included;
  channels_last and transposed arguments once more by hand;
* determinism: every backward op (and every reduction) gives bitwise equal results twice, at sizes
  that exercise split-K, multi-chunk reductions and overlapping pooling windows;
* a LeNet training step captured in a CUDA graph replays bitwise equal to eager (capture would
  also fail on any host synchronisation inside an op);
* tensors past 2^31 elements through relu and max_pool2d (slow; ~9-26 GB of GPU memory);
* bad calls raise the CPU kernels' errors on CUDA too; data-dependent errors (binary cross
  entropy's domain, cross_entropy's targets) are device-side asserts naming the argument.

The sample-driven tests (tests/test_samples.py: against torch, gradcheck) and the per-op test
files run on every device, CUDA included; this file does not repeat them.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import samples
from helpers import FLOAT_DTYPES

P = torch.ops.pyengine
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _built_with_cuda():
    import pyengine

    return bool(getattr(pyengine._C, "built_with_cuda", False))


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(torch.cuda.is_available() and not _built_with_cuda(),
                       reason="pyengine was built without its CUDA kernels (no nvcc at build "
                       "time)"),
]

dtypes = pytest.mark.parametrize("dtype", FLOAT_DTYPES)


# ---- helpers ----------------------------------------------------------------------------------

GPU = "cuda"


def same_layout(value, device=None, dtype=None):
    """value (a tensor, or a list / tuple of them) on `device`, floating tensors in `dtype`, with
    value's very strides and storage offset, also for the layouts .to() would make dense
    (every other element, a stride-0 dim, an offset): the whole storage moves."""
    if isinstance(value, (list, tuple)):
        return type(value)(same_layout(v, device, dtype) for v in value)
    if not isinstance(value, torch.Tensor):
        return value
    t = value.detach()
    storage = t.as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)
    moved = storage.to(device=device or t.device,
                       dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
    return moved.as_strided(t.shape, t.stride(), t.storage_offset())


def to_cuda(value):
    return same_layout(value, GPU)


def to_cpu(value):
    return same_layout(value, "cpu")


def assert_same(actual, expected, dtype, exact=False, what=""):
    """CUDA result `actual` (moved to CPU) against the CPU kernel's `expected`."""
    if expected is None or actual is None:
        assert actual is None and expected is None, what
        return
    if isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), what
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, dtype, exact, f"{what}[{i}]")
        return
    actual = to_cpu(actual)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    # The same strides as the CPU kernel's (torch's layout rules: csrc/common/layout.h).
    assert actual.stride() == expected.stride(), (what, actual.stride(), expected.stride())
    if exact or not expected.is_floating_point():
        assert torch.equal(actual.nan_to_num(0.5), expected.nan_to_num(0.5)) and torch.equal(
            actual.isnan(), expected.isnan()), what
        return
    # Summation orders differ (CPU SIMD lanes and blocking against GPU tiles and trees), so
    # results agree to a few ulps of the largest accumulated magnitude, not bitwise.
    finite = expected[expected.isfinite()]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    tol = dict(rtol=1e-4, atol=2e-5 * scale) if dtype == torch.float32 else \
        dict(rtol=1e-9, atol=1e-11 * scale)
    torch.testing.assert_close(actual, expected, equal_nan=True, msg=lambda m: f"{what}: {m}",
                               **tol)


def parity(op, *args, exact=False, dtype=torch.float64, what=""):
    """Runs op on CPU and on CUDA (arguments moved, layouts kept), compares, returns the CPU
    result."""
    expected = op(*args)
    actual = op(*to_cuda(args))
    torch.cuda.synchronize()
    assert_same(to_cpu(actual) if isinstance(actual, (list, tuple)) else actual, expected, dtype,
                exact, what or str(op))
    return expected


# ---- every operator on its samples --------------------------------------------------------------

# No rounding at all (a comparison, a product by the slope, a max): CUDA must match bitwise.
EXACT = {"relu", "relu_backward", "leaky_relu", "leaky_relu_backward", "max_pool2d",
         "max_pool2d_with_indices"}


@dtypes
@pytest.mark.parametrize("sample", [s for s in samples.all_samples() if not s.case.expect_error],
                         ids=lambda s: s.id)
def test_parity(sample, dtype):
    """Each operator call the sample makes, its floating tensors in `dtype`, on CUDA against the
    CPU kernel (under no_grad: each op's own kernel, max_pool2d's too)."""
    calls = samples.op_calls(sample.case)
    assert calls, sample
    for c in calls:
        args = same_layout(c.args, dtype=dtype)
        with torch.no_grad():
            parity(c.op, *args, exact=c.name in EXACT, dtype=dtype, what=f"{c.name} of {sample}")


ACTIVATIONS = {  # name: (forward, backward, backward takes the input rather than the result)
    "relu": (lambda x: P.relu(x), lambda g, s: P.relu_backward(g, s), False),
    "leaky_relu": (lambda x: P.leaky_relu(x, 0.3), lambda g, s: P.leaky_relu_backward(g, s, 0.3),
                   True),
    "sigmoid": (lambda x: P.sigmoid(x), lambda g, s: P.sigmoid_backward(g, s), False),
    "tanh": (lambda x: P.tanh(x), lambda g, s: P.tanh_backward(g, s), False),
}


# ---- memory layouts ------------------------------------------------------------------------------

@dtypes
def test_layout_parity(dtype):
    """channels_last and transposed arguments: the CUDA ops return the CPU ops' strides (which
    tests/test_layout.py holds to torch's)."""
    cl = torch.channels_last
    x = torch.randn(2, 4, 9, 9, dtype=dtype).to(memory_format=cl)
    w = torch.randn(6, 4, 3, 3, dtype=dtype)
    for ww in (w, w.to(memory_format=cl)):
        y = parity(P.conv2d, x, ww, None, [1, 1], [1, 1], [1, 1], 1, dtype=dtype, what="conv2d")
        parity(P.conv2d, x[0], ww, None, [1, 1], [1, 1], [1, 1], 1, dtype=dtype,
               what="conv2d unbatched")
        g = torch.randn(y.shape, dtype=dtype)
        parity(P.conv2d_backward, g, x, ww, [1, 1], [1, 1], [1, 1], 1, [True, True, True],
               dtype=dtype, what="conv2d_backward")
    pool = ([3, 3], [2, 2], [1, 1], [1, 1], True)
    out, idx = parity(P.max_pool2d_with_indices, x, *pool, exact=True, dtype=dtype, what="pool")
    parity(P.max_pool2d_backward, torch.randn(out.shape, dtype=dtype), x, idx, *pool,
           dtype=dtype, what="pool backward")
    xt = torch.randn(7, 5, dtype=dtype).t()
    for name, (fwd, bwd, from_input) in ACTIVATIONS.items():
        for inp, g in ((x, torch.randn(x.shape, dtype=dtype)),
                       (xt, torch.randn(xt.shape, dtype=dtype)),
                       (xt, torch.randn(xt.shape, dtype=dtype).t().contiguous().t())):
            y = parity(fwd, inp, dtype=dtype, what=name)
            parity(bwd, g, inp if from_input else y, dtype=dtype, what=name + "_backward")
    wt = torch.randn(7, 6, dtype=dtype).t()  # a (6, 7) weight, column-major like xt
    parity(P.linear_backward, torch.randn(5, 6, dtype=dtype), xt, wt, [True, True, True],
           dtype=dtype, what="linear_backward, column-major operands")
    t = torch.rand(x.shape, dtype=dtype)
    p = torch.rand(x.shape, dtype=dtype).to(memory_format=cl)
    for loss in ("mse_loss", "binary_cross_entropy"):
        out = parity(getattr(P, loss), p, t, None, 0, dtype=dtype, what=loss)
        parity(getattr(P, loss + "_backward"), torch.randn(out.shape, dtype=dtype), p, t, None, 0,
               dtype=dtype, what=loss + "_backward")


# ---- determinism --------------------------------------------------------------------------------

def _twice(op, *args):
    first, second = op(*args), op(*args)
    torch.cuda.synchronize()
    flat = lambda r: [t for t in (r if isinstance(r, (list, tuple)) else [r]) if t is not None]
    for a, b in zip(flat(first), flat(second)):
        assert torch.equal(a, b), f"{op} gave different results on two runs"


@dtypes
def test_backward_ops_and_reductions_are_deterministic(dtype):
    dev = dict(device="cuda", dtype=dtype)
    x, w = torch.randn(64, 3, 32, 32, **dev), torch.randn(8, 3, 5, 5, **dev)
    g = torch.randn(64, 8, 28, 28, **dev)
    _twice(P.conv2d_backward, g, x, w, [1, 1], [0, 0], [1, 1], 1, [True, True, True])
    x, w = torch.randn(5000, 64, **dev), torch.randn(32, 64, **dev)
    _twice(P.linear_backward, torch.randn(5000, 32, **dev), x, w, [True, True, True])
    x = torch.randn(8, 4, 33, 33, **dev)
    out, idx = P.max_pool2d_with_indices(x, [3, 3], [1, 1], [1, 1], [1, 1], False)
    _twice(P.max_pool2d_backward, torch.randn_like(out), x, idx, [3, 3], [1, 1], [1, 1], [1, 1],
           False)
    for dim in (0, 1):
        y = P.softmax(torch.randn(300, 1000, **dev), dim)
        _twice(P.softmax_backward, torch.randn_like(y), y, dim)
        _twice(P.log_softmax_backward, torch.randn_like(y), y.log(), dim)
    n = 100_003
    x, t, w = torch.rand(n, **dev), torch.rand(n, **dev), torch.rand(n, **dev)
    for reduction in (1, 2):
        _twice(P.mse_loss, x, t, w, reduction)
        _twice(P.binary_cross_entropy, x, t, w, reduction)
        _twice(P.mse_loss_backward, torch.tensor(1.0, **dev), x, t, w, reduction)
        _twice(P.binary_cross_entropy_backward, torch.tensor(1.0, **dev), x, t, w, reduction)
    x, t = torch.randn(10_000, 10, **dev), torch.randint(0, 10, (10_000,), device="cuda")
    cw = torch.rand(10, **dev)
    for reduction in (1, 2):
        _twice(P.cross_entropy, x, t, cw, reduction, -100)
        _twice(P.cross_entropy_backward, torch.tensor(1.0, **dev), x, t, cw, reduction, -100)


# ---- CUDA graphs --------------------------------------------------------------------------------

def test_lenet_training_step_in_a_cuda_graph_replays_like_eager():
    from pyengine.models import LeNet  # the tutorial network (pyengine/models.py)
    import pyengine.functional as PF

    model = LeNet().cuda()
    params = list(model.parameters())
    x = torch.randn(64, 1, 32, 32, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")

    def step():
        loss = PF.cross_entropy(model(x), y)
        loss.backward()
        return loss

    side = torch.cuda.Stream()  # warm up off the capture stream, as torch's docs do
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for p in params:
                p.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)

    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # raises if any op synchronises with the host
        static_loss = step()
    static_grads = [p.grad for p in params]

    for _ in range(2):
        x.copy_(torch.randn_like(x))
        y.copy_(torch.randint_like(y, 10))
        graph.replay()
        for p in params:
            p.grad = None
        eager_loss = step()
        torch.cuda.synchronize()
        assert torch.equal(static_loss, eager_loss)
        for p, static in zip(params, static_grads):
            assert torch.equal(static, p.grad)


# ---- tensors past 2^31 elements -----------------------------------------------------------------

def _need_memory(gb):
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    if total < gb:
        pytest.skip(f"needs ~{gb} GiB of GPU memory, the device has {total:.0f}")


@pytest.mark.slow
def test_relu_past_2_pow_31_elements():
    _need_memory(24)
    n = 2**31 + 1000
    x = torch.full((n,), -1.0, device="cuda")
    picks = {5: 4.0, 2**31 - 1: 1.5, 2**31 + 7: 3.0, n - 1: 2.0}
    for i, v in picks.items():
        x[i] = v
    y = P.relu(x)
    for i, v in picks.items():
        assert float(y[i]) == v
    assert float(y[2**31]) == 0.0 and float(y[0]) == 0.0
    assert int(torch.count_nonzero(y)) == len(picks)
    del x, y
    torch.cuda.empty_cache()


@pytest.mark.slow
def test_max_pool2d_past_2_pow_31_elements():
    _need_memory(40)
    side = 46341  # one plane of 46341^2 = 2^31 + 4633 elements: flat indices pass 2^31 too
    x = torch.zeros(1, 1, side, side, device="cuda")
    x[0, 0, side - 1, side - 1] = 5.0
    x[0, 0, 0, 1] = 3.0
    x[0, 0, 30001, 20000] = 7.0
    out, idx = P.max_pool2d_with_indices(x, [2, 2], [2, 2], [0, 0], [1, 1], True)
    assert out.shape == (1, 1, 23171, 23171)
    expect = {(23170, 23170): (5.0, (side - 1) * side + side - 1),
              (0, 0): (3.0, 1),
              (15000, 10000): (7.0, 30001 * side + 20000),
              (100, 200): (0.0, 200 * side + 400)}  # all zeros: the window's first element wins
    for (oh, ow), (value, index) in expect.items():
        assert float(out[0, 0, oh, ow]) == value
        assert int(idx[0, 0, oh, ow]) == index
    assert int(torch.count_nonzero(out)) == 3
    grad = P.max_pool2d_backward(torch.ones_like(out), x, idx, [2, 2], [2, 2], [0, 0], [1, 1],
                                 True)
    del x
    for (r, c), v in {(side - 1, side - 1): 1.0, (30001, 20000): 1.0, (30000, 20000): 0.0,
                      (200, 400): 1.0, (200, 401): 0.0, (0, 1): 1.0, (0, 0): 0.0}.items():
        assert float(grad[0, 0, r, c]) == v
    assert int(torch.count_nonzero(grad)) == out.numel()
    del out, idx, grad
    torch.cuda.empty_cache()


# ---- errors -------------------------------------------------------------------------------------

def _bad_calls():
    f, d = torch.float32, torch.float64
    r = lambda *s, dtype=f: torch.randn(*s, dtype=dtype)
    conv = lambda x, w, b=None, groups=1: P.conv2d(x, w, b, [1, 1], [0, 0], [1, 1], groups)
    pool = lambda x, k=(2, 2), p=(0, 0): P.max_pool2d(x, list(k), [2, 2], list(p), [1, 1], False)
    return {
        "conv2d rank": (lambda: conv(r(3, 5), r(4, 3, 1, 1)), RuntimeError, "3-D (C, H, W)"),
        "conv2d channels": (lambda: conv(r(1, 3, 5, 5), r(4, 2, 1, 1)), RuntimeError, "channels"),
        "conv2d groups": (lambda: conv(r(1, 4, 5, 5), r(3, 2, 1, 1), groups=2), RuntimeError,
                          "divisible by groups"),
        "conv2d int input": (lambda: conv(torch.ones(1, 1, 3, 3, dtype=torch.long),
                                          r(1, 1, 1, 1)),
                             NotImplementedError, "float32 or float64"),
        "conv2d dtypes": (lambda: conv(r(1, 1, 3, 3), r(1, 1, 1, 1, dtype=d)), RuntimeError,
                          "same dtype"),
        "conv2d kernel": (lambda: conv(r(1, 1, 3, 3), r(1, 1, 5, 5)), RuntimeError, "fit"),
        "conv2d bias": (lambda: conv(r(1, 1, 3, 3), r(2, 1, 1, 1), r(3)), RuntimeError, "bias"),
        "conv2d_backward grad": (lambda: P.conv2d_backward(r(1, 2, 3, 4), r(1, 1, 3, 3),
                                                           r(2, 1, 1, 1), [1, 1], [0, 0], [1, 1],
                                                           1, [True, True, True]),
                                 RuntimeError, "grad_output"),
        "max_pool2d rank": (lambda: pool(r(4, 4)), RuntimeError, "3-D (C, H, W)"),
        "max_pool2d padding": (lambda: pool(r(1, 1, 4, 4), p=(2, 2)), RuntimeError, "padding"),
        "max_pool2d kernel": (lambda: pool(r(1, 1, 1, 1), k=(3, 3)), RuntimeError, "fit"),
        "max_pool2d int": (lambda: pool(torch.ones(1, 1, 4, 4, dtype=torch.int32)),
                           NotImplementedError,
                           "float32 or float64"),
        "max_pool2d_backward indices": (
            lambda: P.max_pool2d_backward(r(1, 1, 2, 2), r(1, 1, 4, 4),
                                          torch.zeros(1, 1, 2, 2, dtype=torch.int32), [2, 2],
                                          [2, 2], [0, 0], [1, 1], False),
            RuntimeError, "int64"),
        "linear features": (lambda: P.linear(r(2, 3), r(4, 5), None), RuntimeError, "in_features"),
        "linear bias": (lambda: P.linear(r(2, 3), r(4, 3), r(5)), RuntimeError, "bias"),
        "linear weight rank": (lambda: P.linear(r(2, 3), r(3), None), RuntimeError, "2-D"),
        "relu int": (lambda: P.relu(torch.arange(3)), NotImplementedError, "float32 or float64"),
        "relu_backward shape": (lambda: P.relu_backward(r(3), r(4)), RuntimeError, "same shape"),
        "softmax dim": (lambda: P.softmax(r(3), 2), IndexError, "dim out of range"),
        "log_softmax int": (lambda: P.log_softmax(torch.arange(3), 0), NotImplementedError,
                            "float32 or float64"),
        "mse_loss shape": (lambda: P.mse_loss(r(3), r(4), None, 1), RuntimeError, "same shape"),
        "mse_loss reduction": (lambda: P.mse_loss(r(3), r(3), None, 3), RuntimeError, "reduction"),
        "bce weight": (lambda: P.binary_cross_entropy(r(3).sigmoid(), r(3).sigmoid(), r(2), 1),
                       RuntimeError, "weight"),
        "cross_entropy target dtype": (lambda: P.cross_entropy(r(2, 3), r(2), None, 1, -100),
                                       RuntimeError, "int64"),
        "cross_entropy target shape": (
            lambda: P.cross_entropy(r(2, 3), torch.zeros(3, dtype=torch.long), None, 1, -100),
            ValueError, "target"),
        "cross_entropy rank": (
            lambda: P.cross_entropy(r(2, 3, 4), torch.zeros(2, dtype=torch.long), None, 1, -100),
            RuntimeError, "1-D (C) or 2-D (N, C)"),
        "cross_entropy weight": (
            lambda: P.cross_entropy(r(2, 3), torch.zeros(2, dtype=torch.long), r(4), 1, -100),
            RuntimeError, "weight"),
    }


def _on_cuda(fn):
    """fn with every tensor factory call landing on the GPU."""
    def run():
        with torch.device("cuda"):
            return fn()
    return run


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_calls_raise_the_cpu_errors_on_cuda(case):
    fn, exc_type, fragment = _bad_calls()[case]
    with pytest.raises(exc_type) as on_cpu:
        fn()
    with pytest.raises(exc_type) as on_cuda:
        _on_cuda(fn)()
    assert fragment in str(on_cuda.value)
    assert str(on_cuda.value) == str(on_cpu.value)


def test_mixed_devices_raise_clear_errors():
    c, g = torch.randn, lambda *s: torch.randn(*s, device="cuda")
    cases = [
        (lambda: P.conv2d(g(1, 1, 3, 3), c(1, 1, 1, 1), None, [1, 1], [0, 0], [1, 1], 1),
         "expected weight to be on the same device as input"),
        (lambda: P.conv2d(c(1, 1, 3, 3), g(1, 1, 1, 1), None, [1, 1], [0, 0], [1, 1], 1),
         "expected weight to be on the same device as input"),
        (lambda: P.linear(g(2, 3), g(4, 3), c(4)), "expected bias to be on the same device"),
        (lambda: P.cross_entropy(g(2, 3), torch.zeros(2, dtype=torch.long), None, 1, -100),
         "expected target to be on the same device as input"),
        (lambda: P.mse_loss(g(3), c(3), None, 1), "expected target to be on the same device"),
        (lambda: P.relu_backward(g(3), c(3)), "expected result to be on the same device"),
        (lambda: P.max_pool2d_backward(g(1, 1, 2, 2), g(1, 1, 4, 4),
                                       torch.zeros(1, 1, 2, 2, dtype=torch.long), [2, 2], [2, 2],
                                       [0, 0], [1, 1], False), "expected indices on cuda"),
    ]
    for fn, fragment in cases:
        with pytest.raises(RuntimeError, match=fragment):
            fn()


DEVICE_ASSERT_CASES = {
    "bce_input": ("p = torch.rand(100, device='cuda'); p[42] = 1.5\n"
                  "P.binary_cross_entropy(p, torch.rand(100, device='cuda'), None, 1)",
                  "pyengine.binary_cross_entropy: all elements of input should be between 0 and 1"
                  ", but got input element 1.5 at flat index 42"),
    "bce_target": ("t = torch.rand(100, device='cuda'); t[7] = -0.5\n"
                   "P.binary_cross_entropy(torch.rand(100, device='cuda'), t, None, 0)",
                   "all elements of target should be between 0 and 1"),
    "cross_entropy_target": ("P.cross_entropy(torch.randn(4, 3, device='cuda'), "
                             "torch.tensor([0, 1, 5, 2], device='cuda'), None, 1, -100)",
                             "pyengine.cross_entropy: target 5 is out of bounds: expected target "
                             "values in [0, 3) or ignore_index=-100, but got target[2] = 5"),
    "max_pool2d_backward_index": (
        "x = torch.randn(1, 2, 4, 4, device='cuda')\n"
        "out, idx = P.max_pool2d_with_indices(x, [2, 2], [2, 2], [0, 0], [1, 1], False)\n"
        "idx[0, 1, 1, 0] = 16\n"
        "P.max_pool2d_backward(torch.ones_like(out), x, idx, [2, 2], [2, 2], [0, 0], [1, 1], "
        "False)",
        "pyengine.max_pool2d_backward: the index of output [1, 0] of plane 1 (n * C + c) is 16, "
        "outside the 4x4 input plane"),
    "cross_entropy_backward_target": (
        "P.cross_entropy_backward(torch.tensor(1.0, device='cuda'), torch.randn(4, 3, "
        "device='cuda'), torch.tensor([0, -1, 1, 2], device='cuda'), None, 1, -100)",
        "pyengine.cross_entropy_backward: target -1 is out of bounds"),
}


@pytest.mark.parametrize("case", list(DEVICE_ASSERT_CASES))
def test_device_assert_names_the_bad_argument(case):
    """A device-side assert poisons the CUDA context, so each case runs in a process of its own."""
    call, message = DEVICE_ASSERT_CASES[case]
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, {root!r})
        import torch, pyengine
        P = torch.ops.pyengine
        {call}
        torch.cuda.synchronize()
        print("NO ERROR")
    """).format(root=ROOT, call=call.replace("\n", "\n        "))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "NO ERROR" not in out, out[-3000:]
    assert "device-side assert" in out, out[-3000:]
    assert message in out, out[-3000:]
